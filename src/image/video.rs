//! Video files through the `ffmpeg` and `ffprobe` commands: a subprocess counts the frames
//! (`ffprobe -count_packets`, no decoding) and another decodes only the chosen ones
//! (`select` filter) to a pipe as PPM images, each with its own size (rotated videos
//! included). Nothing is linked and nothing reaches the network.

use super::decode::ImageError;
use super::rgb::RgbImage;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The two commands, found on the PATH.
#[derive(Debug, Clone)]
pub(super) struct Ffmpeg {
    ffmpeg: PathBuf,
    ffprobe: PathBuf,
}

impl Ffmpeg {
    /// Both commands from the PATH, or `None`.
    pub(super) fn find() -> Option<Self> {
        let find = |name: &str| {
            std::env::split_paths(&std::env::var_os("PATH")?)
                .map(|d| d.join(name))
                .find(|p| p.is_file())
        };
        Some(Ffmpeg {
            ffmpeg: find("ffmpeg")?,
            ffprobe: find("ffprobe")?,
        })
    }
}

fn failed(name: &Path, what: &str, stderr: &[u8]) -> ImageError {
    let text = String::from_utf8_lossy(stderr);
    let last = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim();
    ImageError::Video {
        path: name.to_path_buf(),
        detail: format!("{what}: {last}"),
    }
}

/// What a probe finds: when each frame starts (seconds), the clip's duration and the frame
/// size as stored (before any rotation; width × height is what matters).
pub(super) struct Probe {
    pub(super) starts: Vec<f64>,
    pub(super) duration: f64,
    pub(super) size: (u32, u32),
}

/// The frame count from the container's packets, at the stream's average frame rate.
pub(super) fn probe(ff: &Ffmpeg, file: &Path, name: &Path) -> Result<Probe, ImageError> {
    let out = Command::new(&ff.ffprobe)
        .args(["-v", "error", "-select_streams", "v:0", "-count_packets"])
        .args([
            "-show_entries",
            "stream=nb_read_packets,avg_frame_rate,r_frame_rate,width,height",
        ])
        .args(["-of", "default=noprint_wrappers=1"])
        .arg(file)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| ImageError::Io {
            path: ff.ffprobe.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(failed(
            name,
            "ffprobe cannot read it as a video",
            &out.stderr,
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .map(str::trim)
    };
    let rate = |v: Option<&str>| -> Option<f64> {
        let (n, d) = v?.split_once('/')?;
        let r = n.parse::<f64>().ok()? / d.parse::<f64>().ok()?;
        (r.is_finite() && r > 0.0).then_some(r)
    };
    let n: usize = match field("nb_read_packets").and_then(|v| v.parse().ok()) {
        Some(n) => n,
        None => return Err(failed(name, "it has no video stream", &out.stderr)),
    };
    let fps = rate(field("avg_frame_rate"))
        .or_else(|| rate(field("r_frame_rate")))
        .unwrap_or(0.0);
    let starts = (0..n)
        .map(|i| if fps > 0.0 { i as f64 / fps } else { 0.0 })
        .collect();
    let duration = if fps > 0.0 { n as f64 / fps } else { 0.0 };
    let dim = |k: &str| field(k).and_then(|v| v.parse::<u32>().ok()).unwrap_or(0);
    Ok(Probe {
        starts,
        duration,
        size: (dim("width"), dim("height")),
    })
}

/// Decodes the frames numbered `wanted` (ascending, distinct), each checked against
/// `max_pixels` before its pixels are read.
pub(super) fn frames(
    ff: &Ffmpeg,
    file: &Path,
    name: &Path,
    wanted: &[usize],
    max_pixels: u64,
) -> Result<Vec<(usize, RgbImage)>, ImageError> {
    let select: Vec<String> = wanted.iter().map(|i| format!("eq(n\\,{i})")).collect();
    let mut child = Command::new(&ff.ffmpeg)
        .args(["-v", "error", "-nostdin", "-i"])
        .arg(file)
        .args(["-map", "0:v:0", "-vf"])
        .arg(format!("select={}", select.join("+")))
        .args([
            "-fps_mode",
            "passthrough",
            "-f",
            "image2pipe",
            "-c:v",
            "ppm",
            "pipe:1",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| ImageError::Io {
            path: ff.ffmpeg.clone(),
            source,
        })?;
    let mut stdout = BufReader::new(child.stdout.take().expect("piped"));
    let mut out = Vec::with_capacity(wanted.len());
    let read = (|| {
        for &index in wanted {
            match read_ppm(&mut stdout, name, max_pixels)? {
                Some(frame) => out.push((index, frame)),
                None => break,
            }
        }
        Ok::<_, ImageError>(())
    })();
    if read.is_err() {
        let _ = child.kill();
    }
    // The pipe may still hold data (more frames than asked): drain it so ffmpeg can exit.
    let _ = std::io::copy(&mut stdout, &mut std::io::sink());
    let mut stderr = Vec::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_end(&mut stderr);
    }
    let status = child.wait().map_err(|source| ImageError::Io {
        path: ff.ffmpeg.clone(),
        source,
    })?;
    read?;
    if !status.success() {
        return Err(failed(name, "ffmpeg cannot decode it", &stderr));
    }
    Ok(out)
}

/// One binary PPM (`P6`, 8-bit) from the pipe, or `None` at its end.
fn read_ppm(
    r: &mut impl BufRead,
    name: &Path,
    max_pixels: u64,
) -> Result<Option<RgbImage>, ImageError> {
    let bad = |detail: String| ImageError::Video {
        path: name.to_path_buf(),
        detail,
    };
    let io = |e: std::io::Error| bad(format!("reading ffmpeg's output: {e}"));
    if r.fill_buf().map_err(io)?.is_empty() {
        return Ok(None);
    }
    // "P6", width, height, maxval, each followed by one whitespace byte.
    let mut fields = [0u64; 3];
    let mut token = Vec::new();
    for k in 0..4 {
        token.clear();
        loop {
            let mut b = [0u8];
            r.read_exact(&mut b).map_err(io)?;
            if b[0].is_ascii_whitespace() {
                if token.is_empty() {
                    continue;
                }
                break;
            }
            if token.len() > 16 {
                return Err(bad("ffmpeg's output is not a PPM image".into()));
            }
            token.push(b[0]);
        }
        if k == 0 {
            if token != b"P6" {
                return Err(bad("ffmpeg's output is not a PPM image".into()));
            }
        } else {
            fields[k - 1] = std::str::from_utf8(&token)
                .ok()
                .and_then(|t| t.parse().ok())
                .ok_or_else(|| bad("ffmpeg's output has a bad PPM header".into()))?;
        }
    }
    let [w, h, maxval] = fields;
    if maxval != 255 || w == 0 || h == 0 || w > u64::from(u32::MAX) || h > u64::from(u32::MAX) {
        return Err(bad(format!(
            "ffmpeg's frame is {w}x{h} with maximum {maxval}"
        )));
    }
    if w * h > max_pixels {
        return Err(ImageError::TooLarge {
            path: name.to_path_buf(),
            width: w as u32,
            height: h as u32,
            max_pixels,
        });
    }
    let mut data = vec![0u8; (w * h * 3) as usize];
    r.read_exact(&mut data).map_err(io)?;
    Ok(RgbImage::new(w as u32, h as u32, data))
}
