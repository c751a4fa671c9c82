//! Choosing the next token: greedy, or temperature / top-k / top-p with a seeded RNG.

use crate::options::Sampling;

/// Deterministic RNG for sampling (`--seed`).
pub(super) struct SplitMix64(pub(super) u64);

impl SplitMix64 {
    pub(super) fn next_f32(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 24) as f32
    }
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Greedy, or temperature / top-k / top-p sampling.
/// `log softmax(logits)[i]`, computed stably in f64.
pub(super) fn log_softmax_at(logits: &[f32], i: usize) -> f32 {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let sum: f64 = logits.iter().map(|&v| f64::from(v - max).exp()).sum();
    (f64::from(logits[i] - max) - sum.ln()) as f32
}

pub(super) fn sample(logits: &[f32], s: &Sampling, rng: &mut SplitMix64) -> u32 {
    if s.temperature <= 0.0 {
        return argmax(logits);
    }
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_unstable_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if s.top_k > 0 {
        idx.truncate(s.top_k);
    }
    let max = logits[idx[0]];
    let mut probs: Vec<f32> = idx
        .iter()
        .map(|&i| ((logits[i] - max) / s.temperature).exp())
        .collect();
    let sum: f32 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= sum);
    if s.top_p < 1.0 {
        let mut acc = 0.0;
        let keep = probs.iter().position(|&p| {
            acc += p;
            acc >= s.top_p
        });
        let keep = keep.map_or(probs.len(), |k| k + 1);
        probs.truncate(keep);
        idx.truncate(keep);
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);
    }
    let r = rng.next_f32();
    let mut acc = 0.0;
    for (p, &i) in probs.iter().zip(&idx) {
        acc += p;
        if r < acc {
            return i as u32;
        }
    }
    idx[probs.len() - 1] as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_picks_the_largest() {
        let mut rng = SplitMix64(1);
        assert_eq!(
            sample(&[0.1, 3.0, -1.0, 2.9], &Sampling::default(), &mut rng),
            1
        );
    }

    #[test]
    fn top_k_one_is_greedy_and_sampling_is_seeded() {
        let l = [0.5, 1.0, 0.9, 0.2];
        let s = Sampling {
            temperature: 1.0,
            top_k: 1,
            top_p: 1.0,
            seed: 7,
        };
        assert_eq!(sample(&l, &s, &mut SplitMix64(7)), 1);
        let s = Sampling {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: 7,
        };
        let a: Vec<u32> = {
            let mut r = SplitMix64(7);
            (0..20).map(|_| sample(&l, &s, &mut r)).collect()
        };
        let b: Vec<u32> = {
            let mut r = SplitMix64(7);
            (0..20).map(|_| sample(&l, &s, &mut r)).collect()
        };
        assert_eq!(a, b);
        assert!(
            a.iter().any(|&t| t != 1),
            "temperature 1 should not always pick the top token"
        );
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        // One token holds almost all the mass: top_p 0.5 must always pick it.
        let l = [10.0, 0.0, 0.0, 0.0];
        let s = Sampling {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.5,
            seed: 3,
        };
        let mut r = SplitMix64(3);
        assert!((0..50).all(|_| sample(&l, &s, &mut r) == 0));
    }
}
