//! The image every front end hands to the library: decoded RGB8 pixels in their original,
//! orientation-corrected size.

/// A decoded RGB8 image in its original, orientation-corrected size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Interleaved pixels, row-major HWC, RGB; length `3 * width * height`.
    pub data: Vec<u8>,
}

impl RgbImage {
    /// Wraps an HWC RGB8 buffer, checking that its length matches the size.
    pub fn new(width: u32, height: u32, data: Vec<u8>) -> Option<Self> {
        let expected = (width as u64).checked_mul(height as u64)?.checked_mul(3)?;
        (data.len() as u64 == expected).then_some(Self {
            width,
            height,
            data,
        })
    }
}

/// An image's size in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ImageSize {
    #[allow(missing_docs)]
    pub width: u32,
    #[allow(missing_docs)]
    pub height: u32,
}

impl RgbImage {
    /// The image's size.
    pub fn size(&self) -> ImageSize {
        ImageSize {
            width: self.width,
            height: self.height,
        }
    }
}
