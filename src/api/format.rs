//! The image formats the gateway reads and serves.

/// The image formats the gateway takes (from upstreams, and as uploads), by magic number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    Png,
    Jpeg,
    Webp,
}

impl ImageFormat {
    pub fn sniff(bytes: &[u8]) -> Option<Self> {
        if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
            Some(ImageFormat::Png)
        } else if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
            Some(ImageFormat::Jpeg)
        } else if bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
            Some(ImageFormat::Webp)
        } else {
            None
        }
    }

    /// Whether an image of this format ends where it should: a PNG with its `IEND` chunk, a
    /// JPEG with its end-of-image marker, a WebP as long as its RIFF header says. `head` is its
    /// first 12+ bytes, `tail` its last ones (12 suffice), `len` its length. A truncated
    /// answer (an upstream that cut its body) fails this without decoding the image.
    pub fn is_complete(self, head: &[u8], tail: &[u8], len: usize) -> bool {
        const IEND: [u8; 12] = [0, 0, 0, 0, b'I', b'E', b'N', b'D', 0xAE, 0x42, 0x60, 0x82];
        match self {
            ImageFormat::Png => tail.ends_with(&IEND),
            // Some encoders pad after the marker; it is in the last bytes all the same.
            ImageFormat::Jpeg => tail.windows(2).any(|w| w == [0xFF, 0xD9]),
            ImageFormat::Webp => {
                head.len() >= 8
                    && u32::from_le_bytes([head[4], head[5], head[6], head[7]]) as usize + 8 == len
            }
        }
    }

    pub fn extension(self) -> &'static str {
        match self {
            ImageFormat::Png => "png",
            ImageFormat::Jpeg => "jpg",
            ImageFormat::Webp => "webp",
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            ImageFormat::Png => "image/png",
            ImageFormat::Jpeg => "image/jpeg",
            ImageFormat::Webp => "image/webp",
        }
    }

    pub fn from_extension(ext: &str) -> Option<Self> {
        match ext {
            "png" => Some(ImageFormat::Png),
            "jpg" => Some(ImageFormat::Jpeg),
            "webp" => Some(ImageFormat::Webp),
            _ => None,
        }
    }
}

impl ImageFormat {
    /// The `image` crate's name for it (to read dimensions from a header).
    pub fn image_format(self) -> image::ImageFormat {
        match self {
            ImageFormat::Png => image::ImageFormat::Png,
            ImageFormat::Jpeg => image::ImageFormat::Jpeg,
            ImageFormat::Webp => image::ImageFormat::WebP,
        }
    }
}
