//! NumPy `.npz` archives (a zip of `.npy` arrays, stored or deflated) holding little-endian
//! float32 arrays in C order: big_vision's `vae-oid.npz`, for `pali convert-vae`.

use crate::{ConvertError, Result};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

/// One `.npy` array: little-endian float32 data in C order.
pub(crate) struct NpyArray {
    pub(crate) shape: Vec<usize>,
    /// Raw little-endian bytes, `4 · Π shape` of them.
    pub(crate) data: Vec<u8>,
}

/// Largest `.npy` entry read (the real decoder's biggest array is 0.6 MB).
const MAX_ARRAY_BYTES: u64 = 1 << 30;

/// Reads the named arrays (without `.npy`) from an `.npz` file. Errors name the file and the
/// array: not a zip archive, a missing array, a dtype other than little-endian float32,
/// Fortran order, a bad or truncated header or body.
pub(crate) fn read_npz(path: &Path, wanted: &[&str]) -> Result<BTreeMap<String, NpyArray>> {
    let file = std::fs::File::open(path)
        .map_err(|e| ConvertError::Vae(format!("{}: cannot open: {e}", path.display())))?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file)).map_err(|e| {
        ConvertError::Vae(format!(
            "{} is not an .npz file (not a readable zip archive: {e})",
            path.display()
        ))
    })?;
    let mut out = BTreeMap::new();
    for &name in wanted {
        let bad =
            |why: String| ConvertError::Vae(format!("{}: array {name}: {why}", path.display()));
        let mut entry = match zip.by_name(&format!("{name}.npy")) {
            Ok(e) => e,
            Err(zip::result::ZipError::FileNotFound) => {
                return Err(ConvertError::Vae(format!(
                    "{}: array {name} is missing (is this big_vision's vae-oid.npz?)",
                    path.display()
                )))
            }
            Err(e) => return Err(bad(format!("cannot read: {e}"))),
        };
        if entry.size() > MAX_ARRAY_BYTES {
            return Err(bad(format!("{} bytes is too large", entry.size())));
        }
        // The declared size may lie: reserve at most 64 MiB up front, and never read more
        // than it says.
        let declared = entry.size();
        let mut bytes = Vec::with_capacity(declared.min(64 << 20) as usize);
        (&mut entry)
            .take(declared)
            .read_to_end(&mut bytes)
            .map_err(|e| bad(format!("cannot read: {e}")))?;
        out.insert(name.to_string(), parse_npy(&bytes).map_err(bad)?);
    }
    Ok(out)
}

/// Parses a `.npy` file (format versions 1–3) holding `<f4` data in C order.
fn parse_npy(b: &[u8]) -> std::result::Result<NpyArray, String> {
    if b.len() < 10 || &b[..6] != b"\x93NUMPY" {
        return Err("not a .npy array (bad magic)".into());
    }
    let (header_len, start) = match b[6] {
        1 => (u16::from_le_bytes([b[8], b[9]]) as usize, 10),
        2 | 3 if b.len() >= 12 => (u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize, 12),
        v => return Err(format!(".npy format version {v} is not supported")),
    };
    let header = b
        .get(start..start + header_len)
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or("truncated or non-text .npy header")?;
    let descr = header_value(header, "descr").ok_or("no 'descr' in the .npy header")?;
    let descr = descr.trim_matches(|c| c == '\'' || c == '"');
    if descr != "<f4" {
        return Err(format!(
            "dtype '{descr}' is not supported: only little-endian float32 ('<f4')"
        ));
    }
    match header_value(header, "fortran_order") {
        Some("False") => {}
        Some("True") => return Err("Fortran-order arrays are not supported (C order only)".into()),
        _ => return Err("no valid 'fortran_order' in the .npy header".into()),
    }
    let shape_s = header_value(header, "shape").ok_or("no 'shape' in the .npy header")?;
    let shape = shape_s
        .trim_start_matches('(')
        .trim_end_matches(')')
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|_| format!("bad shape {shape_s} in the .npy header"))?;
    let n = shape
        .iter()
        .try_fold(4usize, |a, &d| a.checked_mul(d))
        .ok_or("shape too large")?;
    let data = &b[start + header_len..];
    if data.len() != n {
        return Err(format!(
            "{} data bytes for shape {shape:?} (float32 needs {n}): truncated or corrupt",
            data.len()
        ));
    }
    Ok(NpyArray {
        shape,
        data: data.to_vec(),
    })
}

/// The raw text of `key`'s value in a `.npy` header (a Python dict literal): a quoted string,
/// `True`/`False`, or a parenthesised tuple.
fn header_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let i = header
        .find(&format!("'{key}'"))
        .or_else(|| header.find(&format!("\"{key}\"")))?;
    let rest = header[i + key.len() + 2..].trim_start().strip_prefix(':')?;
    let rest = rest.trim_start();
    let end = match rest.chars().next()? {
        '(' => rest.find(')')? + 1,
        q @ ('\'' | '"') => rest[1..].find(q)? + 2,
        _ => rest.find([',', '}']).unwrap_or(rest.len()),
    };
    Some(rest[..end].trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn npy(descr: &str, fortran: bool, shape: &str, data: &[f32]) -> Vec<u8> {
        let mut header = format!(
            "{{'descr': '{descr}', 'fortran_order': {}, 'shape': {shape}, }}",
            if fortran { "True" } else { "False" }
        );
        while (10 + header.len() + 1) % 64 != 0 {
            header.push(' ');
        }
        header.push('\n');
        let mut b = b"\x93NUMPY\x01\x00".to_vec();
        b.extend((header.len() as u16).to_le_bytes());
        b.extend(header.as_bytes());
        b.extend(data.iter().flat_map(|v| v.to_le_bytes()));
        b
    }

    #[test]
    fn npy_headers_parse_and_bad_ones_are_named() {
        let a = parse_npy(&npy("<f4", false, "(2, 3)", &[0.0; 6])).unwrap();
        assert_eq!(a.shape, [2, 3]);
        assert_eq!(a.data.len(), 24);
        assert_eq!(
            parse_npy(&npy("<f4", false, "(5,)", &[1.0; 5]))
                .unwrap()
                .shape,
            [5]
        );
        assert_eq!(
            parse_npy(&npy("<f4", false, "()", &[1.0])).unwrap().shape,
            Vec::<usize>::new()
        );
        let err = |b: Vec<u8>| parse_npy(&b).err().unwrap();
        assert!(err(npy("<f8", false, "(3,)", &[0.0; 6])).contains("'<f8'"));
        assert!(err(npy(">f4", false, "(3,)", &[0.0; 3])).contains("little-endian"));
        assert!(err(npy("<f4", true, "(3,)", &[0.0; 3])).contains("Fortran"));
        assert!(err(npy("<f4", false, "(4,)", &[0.0; 3])).contains("truncated"));
        assert!(err(npy("<f4", false, "(x,)", &[0.0; 3])).contains("bad shape"));
        assert!(err(b"PK\x03\x04 not npy".to_vec()).contains("magic"));
        let mut v9 = npy("<f4", false, "(1,)", &[0.0]);
        v9[6] = 9;
        assert!(err(v9).contains("version 9"));
        assert!(err(b"\x93NUMPY\x01\x00\xff\x00{'desc".to_vec()).contains("truncated"));
    }
}
