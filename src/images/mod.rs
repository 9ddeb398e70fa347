//! Turns what a backend returned into what the client asked for (`url` or `b64_json`), keeps
//! images the gateway hosts in a [`BlobStore`] and serves them behind signed, expiring URLs.

mod fetch;
mod s3;
mod signing;
mod store;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use base64::Engine;
use bytes::Bytes;
use sha2::{Digest, Sha256};

pub use crate::api::ImageFormat;
use crate::api::{ApiError, ErrorKind, ImageData, ResponseFormat};
use crate::backends::{Generation, ImagePayload};
use crate::config::{ImageUrlMode, ImageUrlPolicy};

pub use fetch::{is_private, outbound_client, FetchError, ImageFetcher};
pub use s3::S3Store;
pub use signing::{SignatureError, UrlSigner};
pub use store::{BlobStore, LocalStore};

/// An image ready to be sent by the file route.
pub struct ServedImage {
    pub bytes: Bytes,
    pub content_type: &'static str,
    pub etag: String,
    pub max_age: Duration,
}

pub struct ImageService {
    store: Arc<dyn BlobStore>,
    fetcher: ImageFetcher,
    signer: UrlSigner,
    public_base: String,
    ttl: Duration,
}

/// Route prefix of hosted images.
pub const FILES_PREFIX: &str = "/images/";

impl ImageService {
    pub fn new(
        store: Arc<dyn BlobStore>,
        signer: UrlSigner,
        public_base: String,
        ttl: Duration,
    ) -> reqwest::Result<Self> {
        Ok(ImageService {
            store,
            fetcher: ImageFetcher::new()?,
            signer,
            public_base,
            ttl,
        })
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    pub fn signer(&self) -> &UrlSigner {
        &self.signer
    }

    /// Builds the response items in the requested format, whatever the backend returned.
    /// `fallback_revised` fills `revised_prompt` where the model's rules promise one and the
    /// backend gave none; `policy` says how this backend's image URLs are treated.
    pub async fn deliver(
        &self,
        generation: Generation,
        format: ResponseFormat,
        fallback_revised: Option<&str>,
        policy: &ImageUrlPolicy,
        deadline: Instant,
    ) -> Result<Vec<ImageData>, ApiError> {
        let mut out = Vec::with_capacity(generation.images.len());
        for image in generation.images {
            let revised_prompt = image
                .revised_prompt
                .or_else(|| fallback_revised.map(str::to_string));
            let mut item = ImageData {
                revised_prompt,
                ..ImageData::default()
            };
            match (image.payload, format) {
                (ImagePayload::Base64(b64), ResponseFormat::B64Json) => {
                    check_base64(&b64)?;
                    item.b64_json = Some(b64);
                }
                (ImagePayload::Base64(b64), ResponseFormat::Url) => {
                    item.url = Some(self.host(decode_base64(&b64)?).await?);
                }
                (ImagePayload::Bytes(bytes), ResponseFormat::B64Json) => {
                    checked_format(&bytes)?;
                    item.b64_json = Some(encode_base64(&bytes));
                }
                (ImagePayload::Bytes(bytes), ResponseFormat::Url) => {
                    item.url = Some(self.host(bytes).await?);
                }
                (ImagePayload::Url(url), ResponseFormat::Url) => {
                    item.url = Some(match policy.mode {
                        ImageUrlMode::Passthrough => url,
                        ImageUrlMode::Rehost => {
                            self.host(self.download(&url, policy, deadline).await?)
                                .await?
                        }
                    });
                }
                (ImagePayload::Url(url), ResponseFormat::B64Json) => {
                    let bytes = self.download(&url, policy, deadline).await?;
                    checked_format(&bytes)?;
                    item.b64_json = Some(encode_base64(&bytes));
                }
            }
            out.push(item);
        }
        Ok(out)
    }

    async fn download(
        &self,
        url: &str,
        policy: &ImageUrlPolicy,
        deadline: Instant,
    ) -> Result<Bytes, ApiError> {
        self.fetcher
            .fetch(url, policy, deadline)
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "upstream image download refused or failed");
                let kind = if e == FetchError::Timeout {
                    ErrorKind::Timeout
                } else {
                    ErrorKind::BadGateway
                };
                ApiError::new(
                    kind,
                    format!("The upstream provider's image could not be used: {e}."),
                )
                .code("upstream_error")
            })
    }

    /// Stores image bytes under an unguessable name and returns a signed absolute URL.
    pub async fn host(&self, bytes: Bytes) -> Result<String, ApiError> {
        let format = checked_format(&bytes)?;
        let id: [u8; 16] = rand::random();
        let name = format!("{}.{}", hex::encode(id), format.extension());
        self.store.put(&name, bytes).await.map_err(|e| {
            // The image store (disk or S3) is down or full: retryable, and nothing is charged.
            tracing::error!(error = %e, "cannot store image");
            ApiError::new(
                ErrorKind::Unavailable,
                "The gateway could not store the generated image; please retry, or ask for b64_json.",
            )
            .code("image_store_unavailable")
            .retry_after(Duration::from_secs(1))
        })?;
        let (query, _) = self.signer.sign(&name, SystemTime::now(), self.ttl);
        Ok(format!("{}{FILES_PREFIX}{name}?{query}", self.public_base))
    }

    /// Serves a hosted image if the link is genuine and unexpired. Tampered and expired
    /// links are 403, unknown names 404; neither says more.
    pub async fn serve(&self, name: &str, query: Option<&str>) -> Result<ServedImage, ApiError> {
        let format = parse_name(name).ok_or_else(not_found)?;
        let now = SystemTime::now();
        let expires = self.signer.verify(name, query, now).map_err(|e| {
            let message = match e {
                SignatureError::Expired => "This image link has expired.",
                SignatureError::Invalid | SignatureError::Malformed => {
                    "This image link is not valid."
                }
            };
            ApiError::new(ErrorKind::Permission, message)
        })?;
        let bytes = self
            .store
            .get(name)
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "cannot read stored image");
                ApiError::internal("The gateway could not read the image.")
            })?
            .ok_or_else(not_found)?;
        let digest = Sha256::digest(&bytes);
        Ok(ServedImage {
            etag: format!("\"{}\"", hex::encode(&digest[..16])),
            content_type: format.content_type(),
            max_age: expires.duration_since(now).unwrap_or_default(),
            bytes,
        })
    }

    /// Deletes images whose links have all expired.
    pub async fn sweep(&self) -> std::io::Result<usize> {
        // A link lives `ttl` from the moment the file is written; keep some slack (up to a
        // minute) for clocks and writes in progress.
        let slack = self.ttl.min(Duration::from_secs(60));
        let cutoff = SystemTime::now() - self.ttl - slack;
        self.store.delete_older_than(cutoff).await
    }
}

fn not_found() -> ApiError {
    ApiError::new(ErrorKind::NotFound, "No such image.")
}

/// `<32 hex>.<ext>`: anything else (including path tricks) is unknown.
fn parse_name(name: &str) -> Option<ImageFormat> {
    let (id, ext) = name.split_once('.')?;
    let ok = id.len() == 32
        && id
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase());
    ok.then_some(())?;
    ImageFormat::from_extension(ext)
}

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// base64 both ways with SIMD (megabytes per image: several times the scalar speed).
fn encode_base64(bytes: &[u8]) -> Bytes {
    Bytes::from(base64_simd::STANDARD.encode_type::<Vec<u8>>(bytes))
}

fn bad_base64() -> ApiError {
    ApiError::new(
        ErrorKind::BadGateway,
        "The upstream provider returned invalid base64 image data.",
    )
    .code("upstream_error")
}

fn decode_base64(b64: &[u8]) -> Result<Bytes, ApiError> {
    let bytes = Bytes::from(
        base64_simd::STANDARD
            .decode_to_vec(b64)
            .map_err(|_| bad_base64())?,
    );
    checked_format(&bytes)?;
    Ok(bytes)
}

/// Checks base64 text without decoding it all: the alphabet and padding throughout, the
/// image magic number in its first bytes and the format's end in its last (a truncated image
/// is refused). Passing it on unchanged then makes no copy.
fn check_base64(b64: &[u8]) -> Result<ImageFormat, ApiError> {
    if b64.is_empty() || base64_simd::STANDARD.check(b64).is_err() {
        return Err(bad_base64());
    }
    let head = B64
        .decode(&b64[..b64.len().min(16)])
        .map_err(|_| bad_base64())?;
    // The last 24 characters (a multiple of 4, so a whole base64 group): 16 to 18 bytes.
    let tail = B64
        .decode(&b64[b64.len() - b64.len().min(24)..])
        .map_err(|_| bad_base64())?;
    let padding = b64.iter().rev().take(2).filter(|&&c| c == b'=').count();
    let len = b64.len() / 4 * 3 - padding;
    complete(&head, &tail, len)
}

fn checked_format(bytes: &[u8]) -> Result<ImageFormat, ApiError> {
    let tail = &bytes[bytes.len().saturating_sub(16)..];
    complete(&bytes[..bytes.len().min(16)], tail, bytes.len())
}

/// The format of an image whose first and last bytes are `head` and `tail`, if it is one we
/// take and it is whole.
fn complete(head: &[u8], tail: &[u8], len: usize) -> Result<ImageFormat, ApiError> {
    let bad = |what: &str| {
        ApiError::new(
            ErrorKind::BadGateway,
            format!("The upstream provider returned {what}."),
        )
        .code("upstream_error")
    };
    let format = ImageFormat::sniff(head)
        .ok_or_else(|| bad("data that is not a PNG, JPEG or WebP image"))?;
    if !format.is_complete(head, tail, len) {
        return Err(bad(&format!(
            "a truncated {} image",
            format.extension().to_uppercase()
        )));
    }
    Ok(format)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffs_magic_numbers() {
        assert_eq!(
            ImageFormat::sniff(b"\x89PNG\r\n\x1a\nrest"),
            Some(ImageFormat::Png)
        );
        assert_eq!(
            ImageFormat::sniff(&[0xFF, 0xD8, 0xFF, 0xE0]),
            Some(ImageFormat::Jpeg)
        );
        assert_eq!(
            ImageFormat::sniff(b"RIFF\0\0\0\0WEBPVP8 "),
            Some(ImageFormat::Webp)
        );
        assert_eq!(ImageFormat::sniff(b"<html>"), None);
        assert_eq!(ImageFormat::sniff(b""), None);
    }

    #[test]
    fn base64_is_checked_without_decoding_it_all() {
        let png = b"\x89PNG\r\n\x1a\n0123456789abcdef\0\0\0\0IEND\xAE\x42\x60\x82";
        let good = encode_base64(png);
        assert_eq!(check_base64(&good).unwrap(), ImageFormat::Png);
        assert!(check_base64(&encode_base64(b"<html>not an image</html>")).is_err());
        let mut broken = good.to_vec();
        let last = broken.len() - 5;
        broken[last] = b'!';
        assert!(check_base64(&broken).is_err());
        assert!(check_base64(b"").is_err());
        assert!(check_base64(&good[..good.len() - 1]).is_err());
        assert_eq!(decode_base64(&good).unwrap().as_ref(), png);
    }

    #[test]
    fn truncated_images_are_refused_in_base64_and_in_bytes() {
        let mut png = Vec::new();
        image::RgbImage::from_pixel(40, 40, image::Rgb([9, 80, 200]))
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        let mut jpeg = Vec::new();
        image::RgbImage::from_pixel(40, 40, image::Rgb([9, 80, 200]))
            .write_to(
                &mut std::io::Cursor::new(&mut jpeg),
                image::ImageFormat::Jpeg,
            )
            .unwrap();
        let mut webp = b"RIFF\0\0\0\0WEBPVP8L".to_vec();
        webp.extend_from_slice(&[0u8; 27]);
        let size = (webp.len() - 8) as u32;
        webp[4..8].copy_from_slice(&size.to_le_bytes());
        for (name, whole) in [("png", &png), ("jpeg", &jpeg), ("webp", &webp)] {
            assert!(checked_format(whole).is_ok(), "{name} whole");
            assert!(
                check_base64(&encode_base64(whole)).is_ok(),
                "{name} whole, base64"
            );
            // Cut at every length that keeps the base64 valid: all refused.
            for cut in (12..whole.len() - 1).step_by(7) {
                let part = &whole[..cut];
                assert!(checked_format(part).is_err(), "{name} cut at {cut}");
                assert!(
                    check_base64(&encode_base64(part)).is_err(),
                    "{name} cut at {cut}, base64"
                );
            }
        }
    }

    #[test]
    fn names_are_strict() {
        assert!(parse_name("0123456789abcdef0123456789abcdef.png").is_some());
        assert!(parse_name("../0123456789abcdef0123456789abcd.png").is_none());
        assert!(parse_name("0123456789ABCDEF0123456789abcdef.png").is_none());
        assert!(parse_name("0123456789abcdef0123456789abcdef.gif").is_none());
        assert!(parse_name("0123456789abcdef0123456789abcdef").is_none());
    }
}
