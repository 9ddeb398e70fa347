//! The sandbox: offline, deterministic pictures drawn from the prompt, for trying the gateway
//! and testing clients without a GPU or a provider account. It is not a model: the same
//! prompt always gives the same picture, and different prompts give visibly different ones.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use image::codecs::png::{CompressionType, FilterType, PngEncoder};
use image::imageops::FilterType as FilterType2;
use image::{ImageEncoder, Rgb, RgbImage};
use sha2::{Digest, Sha256};

use super::{Backend, BackendError, GeneratedImage, Generation, ImagePayload, UpstreamCall};
use crate::api::{EditInputs, Operation, Size};
use crate::config::SandboxConfig;

pub struct SandboxBackend {
    delay: Option<Duration>,
}

impl SandboxBackend {
    pub fn new(config: &SandboxConfig) -> Self {
        SandboxBackend {
            delay: config.delay,
        }
    }
}

/// A small deterministic generator (xorshift64*), seeded from a hash.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u32) -> u32 {
        (self.next() % u64::from(n.max(1))) as u32
    }

    fn color(&mut self) -> [u8; 3] {
        let v = self.next();
        [v as u8, (v >> 8) as u8, (v >> 16) as u8]
    }
}

fn blend(under: [u8; 3], over: [u8; 3], alpha: u32) -> [u8; 3] {
    let mix = |a: u8, b: u8| ((u32::from(a) * (256 - alpha) + u32::from(b) * alpha) >> 8) as u8;
    [
        mix(under[0], over[0]),
        mix(under[1], over[1]),
        mix(under[2], over[2]),
    ]
}

/// Draws the picture for `prompt`; `index` varies the images of one request.
pub fn render(prompt: &str, index: u32, size: Size) -> RgbImage {
    let digest = Sha256::new()
        .chain_update(prompt.as_bytes())
        .chain_update(index.to_le_bytes())
        .finalize();
    let seed = u64::from_le_bytes(digest[..8].try_into().unwrap_or([1; 8])) | 1;
    let mut rng = Rng(seed);
    let (w, h) = (size.width, size.height);
    let top = rng.color();
    let bottom = rng.color();
    let mut img = RgbImage::from_fn(w, h, |_, y| {
        let t = (y * 256 / h.max(1)).min(256);
        Rgb(blend(top, bottom, t))
    });
    let shapes = 4 + rng.below(5);
    let scale = w.min(h);
    for _ in 0..shapes {
        let color = rng.color();
        let alpha = 120 + rng.below(100);
        let cx = rng.below(w) as i64;
        let cy = rng.below(h) as i64;
        let r = (scale / 12 + rng.below(scale / 4 + 1)) as i64;
        let circle = rng.below(2) == 0;
        let (x0, x1) = ((cx - r).max(0), (cx + r).min(i64::from(w) - 1));
        let (y0, y1) = ((cy - r).max(0), (cy + r).min(i64::from(h) - 1));
        for y in y0..=y1 {
            for x in x0..=x1 {
                let (dx, dy) = (x - cx, y - cy);
                if circle && dx * dx + dy * dy > r * r {
                    continue;
                }
                let px = img.get_pixel_mut(x as u32, y as u32);
                px.0 = blend(px.0, color, alpha);
            }
        }
    }
    img
}

/// An edit (or a variation) of the first uploaded image at `size`: the picture `prompt` would
/// give (a variation: the picture of the image's own digest) blended over it, where the mask is
/// transparent (alpha 0 = edit here, as OpenAI's masks), or lightly over all of it without a
/// mask. Deterministic, so tests can check that pixels outside the mask are untouched. The
/// upload and its mask are decoded once for all `n` images.
pub fn edits(
    inputs: &EditInputs,
    prompt: &str,
    n: u32,
    size: Size,
) -> Result<Vec<RgbImage>, image::ImageError> {
    let first = &inputs.images[0];
    let mut base = image::load_from_memory(&first.bytes)?.to_rgb8();
    if base.dimensions() != (size.width, size.height) {
        base = image::imageops::resize(&base, size.width, size.height, FilterType2::Triangle);
    }
    let seed = match inputs.operation {
        Operation::Variation => hex::encode(Sha256::digest(&first.bytes)),
        _ => prompt.to_string(),
    };
    let mask = match &inputs.mask {
        Some(m) => {
            let mut mask = image::load_from_memory(&m.bytes)?.to_rgba8();
            if mask.dimensions() != (size.width, size.height) {
                mask =
                    image::imageops::resize(&mask, size.width, size.height, FilterType2::Nearest);
            }
            Some(mask)
        }
        None => None,
    };
    Ok((0..n)
        .map(|index| {
            let over = render(&seed, index, size);
            let mut edited = base.clone();
            for (x, y, px) in edited.enumerate_pixels_mut() {
                let alpha = match &mask {
                    Some(mask) if mask.get_pixel(x, y).0[3] == 0 => 256,
                    Some(_) => continue,
                    None => 112,
                };
                px.0 = blend(px.0, over.get_pixel(x, y).0, alpha);
            }
            edited
        })
        .collect())
}

pub fn encode_png(img: &RgbImage) -> Result<Vec<u8>, image::ImageError> {
    let mut out = Vec::with_capacity((img.width() * img.height()) as usize / 4);
    PngEncoder::new_with_quality(&mut out, CompressionType::Fast, FilterType::Sub).write_image(
        img.as_raw(),
        img.width(),
        img.height(),
        image::ExtendedColorType::Rgb8,
    )?;
    Ok(out)
}

#[async_trait]
impl Backend for SandboxBackend {
    fn kind(&self) -> &'static str {
        "sandbox"
    }

    fn can(&self, _operation: Operation) -> bool {
        true
    }

    async fn generate(&self, call: UpstreamCall<'_>) -> Result<Generation, BackendError> {
        super::translate::require_plain_png(call.request)?;
        if let Some(delay) = self.delay {
            if delay > call.remaining() {
                tokio::time::sleep(call.remaining()).await;
                return Err(BackendError::Timeout);
            }
            tokio::time::sleep(delay).await;
        }
        let prompt = call.request.prompt.clone();
        let (n, size) = (call.request.n, call.request.size);
        let inputs = call.request.inputs.clone();
        let images = tokio::task::spawn_blocking(move || match inputs {
            None => (0..n)
                .map(|i| encode_png(&render(&prompt, i, size)).map(Bytes::from))
                .collect::<Result<Vec<_>, _>>(),
            Some(inputs) => edits(&inputs, &prompt, n, size)?
                .iter()
                .map(|img| encode_png(img).map(Bytes::from))
                .collect::<Result<Vec<_>, _>>(),
        })
        .await
        .map_err(|e| BackendError::BadResponse(format!("sandbox renderer failed: {e}")))?
        .map_err(|e| BackendError::BadResponse(format!("sandbox encoder failed: {e}")))?;
        Ok(Generation {
            meta: None,
            images: images
                .into_iter()
                .map(|bytes| GeneratedImage {
                    payload: ImagePayload::Bytes(bytes),
                    revised_prompt: None,
                })
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_prompt_same_picture_different_prompt_different_picture() {
        let size = Size::new(64, 48);
        let a = render("a red fox", 0, size);
        assert_eq!(a.dimensions(), (64, 48));
        assert_eq!(a, render("a red fox", 0, size));
        let b = render("a blue whale", 0, size);
        let differing = a.pixels().zip(b.pixels()).filter(|(p, q)| p != q).count();
        assert!(differing > 64 * 48 / 2, "only {differing} pixels differ");
        assert_ne!(a, render("a red fox", 1, size));
    }

    #[test]
    fn encodes_a_decodable_png_of_the_size() {
        let png = encode_png(&render("x", 0, Size::new(256, 256))).unwrap();
        let decoded = image::load_from_memory(&png).unwrap();
        assert_eq!((decoded.width(), decoded.height()), (256, 256));
    }
}
