//! GGUF reading and writing through ggml's own `gguf_*` code, so the files pali writes are
//! exactly what llama.cpp expects. Writing streams tensor data: the header (with every
//! tensor's name, type, shape and offset) is built first, then data is written tensor by
//! tensor in the same order, never holding more than one tensor in memory.

use crate::sys;
use crate::{Error, GgmlType, Result};
use std::ffi::{CStr, CString};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::ptr;

fn cstring(s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| Error::Invalid(format!("string contains a NUL byte: {s:?}")))
}

/// A metadata value, as read from or written to a GGUF file.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    #[allow(missing_docs)]
    U32(u32),
    #[allow(missing_docs)]
    I32(i32),
    #[allow(missing_docs)]
    U64(u64),
    #[allow(missing_docs)]
    F32(f32),
    #[allow(missing_docs)]
    Bool(bool),
    #[allow(missing_docs)]
    Str(String),
    #[allow(missing_docs)]
    ArrStr(Vec<String>),
    #[allow(missing_docs)]
    ArrF32(Vec<f32>),
    #[allow(missing_docs)]
    ArrI32(Vec<i32>),
    /// Any other scalar or array type, rendered as text (for `pali info`).
    Other(String),
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        fn list<T: std::fmt::Debug>(f: &mut std::fmt::Formatter<'_>, v: &[T]) -> std::fmt::Result {
            if v.len() <= 8 {
                write!(f, "{v:?}")
            } else {
                write!(
                    f,
                    "[{:?}, {:?}, {:?}, … {} items]",
                    v[0],
                    v[1],
                    v[2],
                    v.len()
                )
            }
        }
        match self {
            Value::U32(v) => write!(f, "{v}"),
            Value::I32(v) => write!(f, "{v}"),
            Value::U64(v) => write!(f, "{v}"),
            Value::F32(v) => write!(f, "{v}"),
            Value::Bool(v) => write!(f, "{v}"),
            Value::Str(s) if s.len() > 80 => {
                write!(
                    f,
                    "{:?}… ({} bytes)",
                    s.chars().take(60).collect::<String>(),
                    s.len()
                )
            }
            Value::Str(s) => write!(f, "{s:?}"),
            Value::ArrStr(v) => list(f, v),
            Value::ArrF32(v) => list(f, v),
            Value::ArrI32(v) => list(f, v),
            Value::Other(s) => write!(f, "{s}"),
        }
    }
}

/// One tensor's header entry.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// GGUF tensor name.
    pub name: String,
    /// ggml element type.
    pub ty: GgmlType,
    /// ggml shape (`ne`), innermost first; trailing 1s trimmed to the tensor's rank.
    pub ne: Vec<i64>,
    /// Offset of the data from the start of the data section.
    pub offset: u64,
    /// Size of the data in bytes.
    pub size: u64,
}

impl TensorInfo {
    /// Number of elements.
    pub fn n_elements(&self) -> i64 {
        self.ne.iter().product()
    }
}

/// An open GGUF file: its metadata, and a ggml context holding one (data-less) tensor
/// per entry whose data can be pointed into a mapping of the file.
pub struct GgufFile {
    ctx: *mut sys::gguf_context,
    meta: *mut sys::ggml_context,
    path: PathBuf,
    /// The tensor table, checked at open (names unique, UTF-8; data inside the file).
    tensors: Vec<TensorInfo>,
    /// The ggml tensor of each table entry, in the same order.
    raw: Vec<*mut sys::ggml_tensor>,
}

// SAFETY: the contexts are owned exclusively by this value and ggml does not tie them to a thread.
unsafe impl Send for GgufFile {}

impl Drop for GgufFile {
    fn drop(&mut self) {
        // SAFETY: both pointers came from gguf_init_from_file and are freed once.
        unsafe {
            sys::gguf_free(self.ctx);
            if !self.meta.is_null() {
                sys::ggml_free(self.meta);
            }
        }
    }
}

impl GgufFile {
    /// Opens and parses a GGUF file's header (tensor data is not read).
    pub fn open(path: &Path) -> Result<Self> {
        let meta_ok = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        if meta_ok.is_dir() {
            return Err(Error::Invalid(format!(
                "{} is a directory, not a GGUF file",
                path.display()
            )));
        }
        let mut head = [0u8; 4];
        {
            use std::io::Read;
            let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
            if f.read_exact(&mut head).is_err() || &head != b"GGUF" {
                return Err(Error::Invalid(format!(
                    "{} is not a GGUF file (bad magic)",
                    path.display()
                )));
            }
        }
        let cpath = cstring(&path.to_string_lossy())?;
        let mut meta: *mut sys::ggml_context = ptr::null_mut();
        let params = sys::gguf_init_params {
            no_alloc: true,
            ctx: &mut meta,
        };
        crate::logging::init();
        crate::logging::clear_last_error();
        // SAFETY: valid C string and params; returns NULL on any parse error.
        let ctx = unsafe { sys::gguf_init_from_file(cpath.as_ptr(), params) };
        if ctx.is_null() {
            let why = crate::logging::take_last_error()
                .unwrap_or_else(|| "ggml's GGUF parser rejected it".into());
            return Err(Error::Invalid(format!(
                "{} is corrupt or truncated: {why}",
                path.display()
            )));
        }
        let mut file = GgufFile {
            ctx,
            meta,
            path: path.to_path_buf(),
            tensors: Vec::new(),
            raw: Vec::new(),
        };
        file.read_tensor_table(meta_ok.len())?;
        Ok(file)
    }

    /// Reads and checks the tensor table. ggml's parser checks each entry on its own; what
    /// it leaves to its callers is checked here: a name must be UTF-8 without a NUL (ggml
    /// truncates names at a NUL, so two distinct names could become one), and each tensor's
    /// data must lie inside the file.
    fn read_tensor_table(&mut self, file_len: u64) -> Result<()> {
        let bad = |what: String| Error::Invalid(format!("{}: {what}", self.path.display()));
        let data_offset = self.data_offset();
        // SAFETY: ids are in range; the names are NUL-terminated strings owned by gguf; the
        // ggml tensors were created by gguf_init_from_file in table order.
        unsafe {
            let n = sys::gguf_get_n_tensors(self.ctx);
            let mut t = if self.meta.is_null() {
                ptr::null_mut()
            } else {
                sys::ggml_get_first_tensor(self.meta)
            };
            for i in 0..n {
                let cname = CStr::from_ptr(sys::gguf_get_tensor_name(self.ctx, i));
                let name = cname.to_str().map_err(|_| {
                    bad(format!(
                        "tensor #{i} has a name that is not UTF-8 ({:?})",
                        cname.to_string_lossy()
                    ))
                })?;
                if t.is_null() || CStr::from_ptr((*t).name.as_ptr()) != cname {
                    return Err(bad(format!(
                        "tensor #{i} ({name:?}) is not where its table entry says (a corrupt tensor table)"
                    )));
                }
                if self.tensors.iter().any(|o| o.name == name) {
                    return Err(bad(format!("tensor {name:?} appears twice")));
                }
                let offset = sys::gguf_get_tensor_offset(self.ctx, i) as u64;
                let size = sys::gguf_get_tensor_size(self.ctx, i) as u64;
                let end = data_offset
                    .checked_add(offset)
                    .and_then(|o| o.checked_add(size));
                if end.is_none_or(|e| e > file_len) {
                    return Err(bad(format!(
                        "tensor {name} runs past the end of the file (truncated?)"
                    )));
                }
                let ne_all = (*t).ne;
                let rank = (sys::ggml_n_dims(t) as usize).max(1);
                self.tensors.push(TensorInfo {
                    name: name.to_string(),
                    ty: GgmlType(sys::gguf_get_tensor_type(self.ctx, i)),
                    ne: ne_all[..rank].to_vec(),
                    offset,
                    size,
                });
                self.raw.push(t);
                t = sys::ggml_get_next_tensor(self.meta, t);
            }
        }
        Ok(())
    }

    /// Path the file was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Raw gguf context, for the FFI layer.
    pub(crate) fn raw_meta_ctx(&self) -> *mut sys::ggml_context {
        self.meta
    }

    /// Byte offset of the data section in the file.
    pub fn data_offset(&self) -> u64 {
        // SAFETY: valid context.
        unsafe { sys::gguf_get_data_offset(self.ctx) as u64 }
    }

    fn key_id(&self, key: &str) -> Option<i64> {
        let c = cstring(key).ok()?;
        // SAFETY: valid context and C string.
        let id = unsafe { sys::gguf_find_key(self.ctx, c.as_ptr()) };
        (id >= 0).then_some(id)
    }

    /// Whether a key is present.
    pub fn has(&self, key: &str) -> bool {
        self.key_id(key).is_some()
    }

    /// All keys, in file order.
    pub fn keys(&self) -> Vec<String> {
        // SAFETY: ids are in range; gguf owns the strings.
        unsafe {
            (0..sys::gguf_get_n_kv(self.ctx))
                .map(|i| {
                    CStr::from_ptr(sys::gguf_get_key(self.ctx, i))
                        .to_string_lossy()
                        .into_owned()
                })
                .collect()
        }
    }

    /// A key's value, or `None` if absent.
    pub fn get(&self, key: &str) -> Option<Value> {
        let id = self.key_id(key)?;
        // SAFETY: id is valid; each getter matches the stored type (checked first).
        unsafe {
            let ty = sys::gguf_get_kv_type(self.ctx, id);
            Some(match ty {
                sys::GGUF_TYPE_UINT32 => Value::U32(sys::gguf_get_val_u32(self.ctx, id)),
                sys::GGUF_TYPE_INT32 => Value::I32(sys::gguf_get_val_i32(self.ctx, id)),
                sys::GGUF_TYPE_UINT64 => Value::U64(sys::gguf_get_val_u64(self.ctx, id)),
                sys::GGUF_TYPE_FLOAT32 => Value::F32(sys::gguf_get_val_f32(self.ctx, id)),
                sys::GGUF_TYPE_BOOL => Value::Bool(sys::gguf_get_val_bool(self.ctx, id)),
                sys::GGUF_TYPE_STRING => Value::Str(
                    CStr::from_ptr(sys::gguf_get_val_str(self.ctx, id))
                        .to_string_lossy()
                        .into_owned(),
                ),
                sys::GGUF_TYPE_ARRAY => {
                    let n = sys::gguf_get_arr_n(self.ctx, id);
                    match sys::gguf_get_arr_type(self.ctx, id) {
                        sys::GGUF_TYPE_STRING => Value::ArrStr(
                            (0..n)
                                .map(|i| {
                                    CStr::from_ptr(sys::gguf_get_arr_str(self.ctx, id, i))
                                        .to_string_lossy()
                                        .into_owned()
                                })
                                .collect(),
                        ),
                        sys::GGUF_TYPE_FLOAT32 => {
                            let p = sys::gguf_get_arr_data(self.ctx, id) as *const f32;
                            Value::ArrF32(std::slice::from_raw_parts(p, n).to_vec())
                        }
                        sys::GGUF_TYPE_INT32 => {
                            let p = sys::gguf_get_arr_data(self.ctx, id) as *const i32;
                            Value::ArrI32(std::slice::from_raw_parts(p, n).to_vec())
                        }
                        other => Value::Other(format!("array of {n} (gguf type {other})")),
                    }
                }
                other => {
                    let name = CStr::from_ptr(sys::gguf_type_name(other)).to_string_lossy();
                    Value::Other(format!("<{name}>"))
                }
            })
        }
    }

    fn missing(&self, key: &str, what: &str) -> Error {
        Error::Invalid(format!(
            "{}: metadata key {key} is missing or not {what}",
            self.path.display()
        ))
    }

    /// A required string value.
    pub fn get_str(&self, key: &str) -> Result<String> {
        match self.get(key) {
            Some(Value::Str(s)) => Ok(s),
            _ => Err(self.missing(key, "a string")),
        }
    }

    /// A required unsigned integer value (u32, i32 ≥ 0 or u64 accepted).
    pub fn get_u32(&self, key: &str) -> Result<u32> {
        match self.get(key) {
            Some(Value::U32(v)) => Ok(v),
            Some(Value::I32(v)) if v >= 0 => Ok(v as u32),
            Some(Value::U64(v)) if v <= u32::MAX as u64 => Ok(v as u32),
            _ => Err(self.missing(key, "an unsigned integer")),
        }
    }

    /// A required f32 value.
    pub fn get_f32(&self, key: &str) -> Result<f32> {
        match self.get(key) {
            Some(Value::F32(v)) => Ok(v),
            _ => Err(self.missing(key, "a float")),
        }
    }

    /// A required f32 array.
    pub fn get_arr_f32(&self, key: &str) -> Result<Vec<f32>> {
        match self.get(key) {
            Some(Value::ArrF32(v)) => Ok(v),
            _ => Err(self.missing(key, "a float array")),
        }
    }

    /// The tensor table.
    pub fn tensors(&self) -> Vec<TensorInfo> {
        self.tensors.clone()
    }

    /// The data-less ggml tensor of each table entry, in table order.
    pub(crate) fn raw_tensors(&self) -> &[*mut sys::ggml_tensor] {
        &self.raw
    }

    /// The data-less ggml tensor of that name, for pointing into a mapping.
    pub(crate) fn raw_tensor(&self, name: &str) -> Option<*mut sys::ggml_tensor> {
        let i = self.tensors.iter().position(|t| t.name == name)?;
        Some(self.raw[i])
    }
}

/// Builds a GGUF header, then streams tensor data into a file.
pub struct GgufWriter {
    ctx: *mut sys::gguf_context,
    meta: *mut sys::ggml_context,
    names: Vec<String>,
}

impl Drop for GgufWriter {
    fn drop(&mut self) {
        // SAFETY: owned pointers, freed once.
        unsafe {
            sys::gguf_free(self.ctx);
            sys::ggml_free(self.meta);
        }
    }
}

impl GgufWriter {
    /// An empty header with room for `max_tensors` tensors.
    pub fn new(max_tensors: usize) -> Self {
        // SAFETY: plain constructors; the ggml context only holds tensor structs (no_alloc).
        unsafe {
            let params = sys::ggml_init_params {
                mem_size: sys::ggml_tensor_overhead() * (max_tensors + 1),
                mem_buffer: ptr::null_mut(),
                no_alloc: true,
            };
            GgufWriter {
                ctx: sys::gguf_init_empty(),
                meta: sys::ggml_init(params),
                names: Vec::new(),
            }
        }
    }

    /// Sets a metadata value (replacing any earlier value of that key).
    pub fn set(&mut self, key: &str, value: Value) -> Result<()> {
        let k = cstring(key)?;
        // SAFETY: valid context; arrays are passed with their lengths; gguf copies the data.
        unsafe {
            sys::gguf_remove_key(self.ctx, k.as_ptr());
            match value {
                Value::U32(v) => sys::gguf_set_val_u32(self.ctx, k.as_ptr(), v),
                Value::I32(v) => sys::gguf_set_val_i32(self.ctx, k.as_ptr(), v),
                Value::U64(v) => sys::gguf_set_val_u64(self.ctx, k.as_ptr(), v),
                Value::F32(v) => sys::gguf_set_val_f32(self.ctx, k.as_ptr(), v),
                Value::Bool(v) => sys::gguf_set_val_bool(self.ctx, k.as_ptr(), v),
                Value::Str(s) => {
                    let c = cstring(&s)?;
                    sys::gguf_set_val_str(self.ctx, k.as_ptr(), c.as_ptr())
                }
                Value::ArrStr(v) => {
                    let cs = v.iter().map(|s| cstring(s)).collect::<Result<Vec<_>>>()?;
                    let ptrs: Vec<*const std::os::raw::c_char> =
                        cs.iter().map(|c| c.as_ptr()).collect();
                    sys::gguf_set_arr_str(self.ctx, k.as_ptr(), ptrs.as_ptr() as *mut _, ptrs.len())
                }
                Value::ArrF32(v) => sys::gguf_set_arr_data(
                    self.ctx,
                    k.as_ptr(),
                    sys::GGUF_TYPE_FLOAT32,
                    v.as_ptr() as *const _,
                    v.len(),
                ),
                Value::ArrI32(v) => sys::gguf_set_arr_data(
                    self.ctx,
                    k.as_ptr(),
                    sys::GGUF_TYPE_INT32,
                    v.as_ptr() as *const _,
                    v.len(),
                ),
                Value::Other(_) => {
                    return Err(Error::Invalid(format!(
                        "cannot write key {key}: opaque value"
                    )))
                }
            }
        }
        Ok(())
    }

    /// Declares the next tensor (data is written later, in declaration order).
    pub fn add_tensor(&mut self, name: &str, ty: GgmlType, ne: &[i64]) -> Result<()> {
        if name.len() >= 64 {
            return Err(Error::Invalid(format!(
                "tensor name too long for GGUF: {name}"
            )));
        }
        if self.names.iter().any(|n| n == name) {
            return Err(Error::Invalid(format!("duplicate tensor {name}")));
        }
        if ne.is_empty() || ne.len() > 4 || ne.iter().any(|&d| d <= 0) {
            return Err(Error::Invalid(format!("tensor {name}: bad shape {ne:?}")));
        }
        if ne[0] % ty.block_size() != 0 {
            return Err(Error::Invalid(format!(
                "tensor {name}: row length {} is not a multiple of the {} block size {}",
                ne[0],
                ty,
                ty.block_size()
            )));
        }
        let c = cstring(name)?;
        // SAFETY: the context was sized for the declared tensors; gguf copies the struct.
        unsafe {
            let t = sys::ggml_new_tensor(self.meta, ty.0, ne.len() as i32, ne.as_ptr());
            if t.is_null() {
                return Err(Error::Invalid(
                    "too many tensors for the GGUF writer".into(),
                ));
            }
            sys::ggml_set_name(t, c.as_ptr());
            sys::gguf_add_tensor(self.ctx, t);
        }
        self.names.push(name.to_string());
        Ok(())
    }

    /// Writes the header, then has `fill(index, name, out)` write each tensor's bytes in
    /// declaration order (in as many pieces as it likes); checks each size and pads.
    pub fn write<W: Write>(
        &self,
        out: &mut W,
        mut fill: impl FnMut(usize, &str, &mut dyn Write) -> Result<()>,
    ) -> Result<()> {
        // SAFETY: valid context; meta buffer sized by gguf_get_meta_size.
        let (meta, align) = unsafe {
            let n = sys::gguf_get_meta_size(self.ctx);
            let mut buf = vec![0u8; n];
            sys::gguf_get_meta_data(self.ctx, buf.as_mut_ptr() as *mut _);
            (buf, sys::gguf_get_alignment(self.ctx) as u64)
        };
        let io = |e: std::io::Error| Error::Io(format!("writing GGUF: {e}"));
        out.write_all(&meta).map_err(io)?;
        for (i, name) in self.names.iter().enumerate() {
            // SAFETY: i < number of tensors added.
            let size = unsafe { sys::gguf_get_tensor_size(self.ctx, i as i64) } as u64;
            let mut counted = CountingWriter {
                inner: &mut *out,
                n: 0,
            };
            fill(i, name, &mut counted)?;
            if counted.n != size {
                return Err(Error::Invalid(format!(
                    "tensor {name}: produced {} bytes, header says {size}",
                    counted.n
                )));
            }
            let padded = size.div_ceil(align) * align;
            out.write_all(&vec![0u8; (padded - size) as usize])
                .map_err(io)?;
        }
        Ok(())
    }
}

/// Counts the bytes written through it.
struct CountingWriter<'a, W: Write> {
    inner: &'a mut W,
    n: u64,
}

impl<W: Write> Write for CountingWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let k = self.inner.write(buf)?;
        self.n += k as u64;
        Ok(k)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}
