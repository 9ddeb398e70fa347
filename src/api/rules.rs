//! Per-model request rules. The contract's two presets (`dall-e-2`, `dall-e-3`) are built in;
//! a local model such as `sdxl` declares its own in gateway.yaml.

use std::fmt;
use std::str::FromStr;

/// An image size, `WIDTHxHEIGHT` on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Size {
    pub width: u32,
    pub height: u32,
}

impl Size {
    pub const fn new(width: u32, height: u32) -> Self {
        Size { width, height }
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.write_to(f)
    }
}

impl Size {
    /// `WIDTHxHEIGHT`, as `to_string` gives it without the formatter (every ledger row).
    pub fn text(&self) -> String {
        let mut s = String::with_capacity(11);
        // Writing to a String cannot fail.
        let _ = self.write_to(&mut s);
        s
    }

    /// `WIDTHxHEIGHT`, the numbers through itoa.
    fn write_to(&self, out: &mut impl fmt::Write) -> fmt::Result {
        out.write_str(itoa::Buffer::new().format(self.width))?;
        out.write_char('x')?;
        out.write_str(itoa::Buffer::new().format(self.height))
    }
}

impl FromStr for Size {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (w, h) = s
            .split_once('x')
            .ok_or_else(|| format!("'{s}' is not a size of the form WIDTHxHEIGHT"))?;
        let parse = |v: &str| -> Result<u32, String> {
            if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) || v.len() > 5 {
                return Err(format!("'{s}' is not a size of the form WIDTHxHEIGHT"));
            }
            match v.parse::<u32>() {
                Ok(0) | Err(_) => Err(format!("'{s}' is not a size of the form WIDTHxHEIGHT")),
                Ok(n) => Ok(n),
            }
        };
        Ok(Size::new(parse(w)?, parse(h)?))
    }
}

macro_rules! wire_enum {
    ($name:ident { $($variant:ident => $wire:literal),+ $(,)? }) => {
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($variant),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $wire),+ }
            }

            pub fn parse(s: &str) -> Option<Self> {
                match s { $($wire => Some($name::$variant),)+ _ => None }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

wire_enum!(Quality { Standard => "standard", Hd => "hd" });
wire_enum!(GptQuality { Low => "low", Medium => "medium", High => "high", Xhigh => "xhigh", Max => "max", Auto => "auto" });
wire_enum!(Background { Transparent => "transparent", Opaque => "opaque", Auto => "auto" });
wire_enum!(OutputFormat { Png => "png", Jpeg => "jpeg", Webp => "webp" });
wire_enum!(Moderation { Low => "low", Auto => "auto" });
wire_enum!(Complexity { Low => "low", Medium => "medium", High => "high" });
wire_enum!(Style { Vivid => "vivid", Natural => "natural" });
wire_enum!(ResponseFormat { Url => "url", B64Json => "b64_json" });

/// Which dialect of the Images API a public model speaks at the edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// The contract: dall-e-2/dall-e-3 fields, `response_format`, `style`.
    DallE,
    /// GPT image models: always base64, `background`, `output_format`, streaming, usage.
    GptImage,
}

/// Sizes a GPT image model accepts beyond a fixed list: both sides divisible by `multiple`,
/// aspect ratio at most `max_aspect`:1, pixel count and edge within bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlexibleSizes {
    pub multiple: u32,
    pub max_aspect: u32,
    pub max_edge: u32,
    pub min_pixels: u64,
    pub max_pixels: u64,
}

impl FlexibleSizes {
    /// gpt-image-2's limits.
    pub const GPT_IMAGE_2: FlexibleSizes = FlexibleSizes {
        multiple: 16,
        max_aspect: 3,
        max_edge: 3840,
        min_pixels: 655_360,
        max_pixels: 8_294_400,
    };

    /// Why `size` is not accepted, if it is not.
    pub fn check(&self, size: Size) -> Result<(), String> {
        let (w, h) = (size.width, size.height);
        if w % self.multiple != 0 || h % self.multiple != 0 {
            return Err(format!(
                "width and height must both be divisible by {}",
                self.multiple
            ));
        }
        let (long, short) = (w.max(h), w.min(h));
        if long > short * self.max_aspect {
            return Err(format!(
                "the aspect ratio must be between 1:{0} and {0}:1",
                self.max_aspect
            ));
        }
        if long > self.max_edge {
            return Err(format!("no side may exceed {} pixels", self.max_edge));
        }
        let pixels = u64::from(w) * u64::from(h);
        if pixels < self.min_pixels || pixels > self.max_pixels {
            return Err(format!(
                "the image must have between {} and {} pixels",
                self.min_pixels, self.max_pixels
            ));
        }
        Ok(())
    }

    /// The smallest accepted size with the aspect ratio of `size` (at least as large).
    pub fn smallest_like(&self, size: Size) -> Size {
        let m = u64::from(self.multiple);
        let (w, h) = (u64::from(size.width), u64::from(size.height));
        let mut scale = 1.0f64;
        if w * h < self.min_pixels {
            scale = (self.min_pixels as f64 / (w * h) as f64).sqrt();
        }
        let up = |v: u64| ((v as f64 * scale / m as f64).ceil() as u64 * m) as u32;
        let mut out = Size::new(up(w), up(h));
        while self.check(out).is_err()
            && u64::from(out.width) * u64::from(out.height) < self.min_pixels
        {
            out = Size::new(out.width + self.multiple, out.height + self.multiple);
        }
        out
    }
}

/// What a model accepts. `qualities`/`styles` empty means the field is rejected outright.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelRules {
    pub family: Family,
    /// GPT image models: sizes beyond `sizes` that are accepted (`None`: only the list).
    pub flexible_sizes: Option<FlexibleSizes>,
    /// GPT image models: `size: auto` is accepted (and the default).
    pub auto_size: bool,
    pub gpt_qualities: Vec<GptQuality>,
    pub max_prompt_chars: usize,
    pub max_n: u32,
    pub sizes: Vec<Size>,
    pub default_size: Size,
    pub qualities: Vec<Quality>,
    pub styles: Vec<Style>,
    /// Answers carry `revised_prompt` (dall-e-3 does; the gateway fills in the prompt it sent
    /// when a backend has none).
    pub revised_prompt: bool,
}

pub const DEFAULT_SIZE: Size = Size::new(1024, 1024);

impl ModelRules {
    /// dall-e-2: prompt ≤ 1000 chars, n 1..=10, three square sizes. `quality: standard` (its
    /// only value, as OpenAI accepts it) passes; `hd` and any `style` are rejected.
    pub fn dalle2() -> Self {
        ModelRules {
            family: Family::DallE,
            flexible_sizes: None,
            auto_size: false,
            gpt_qualities: vec![],
            max_prompt_chars: 1000,
            max_n: 10,
            sizes: vec![
                Size::new(256, 256),
                Size::new(512, 512),
                Size::new(1024, 1024),
            ],
            default_size: DEFAULT_SIZE,
            qualities: vec![Quality::Standard],
            styles: vec![],
            revised_prompt: false,
        }
    }

    /// dall-e-3: prompt ≤ 4000 chars, n = 1, square and two wide/tall sizes, quality
    /// standard|hd, style vivid|natural.
    pub fn dalle3() -> Self {
        ModelRules {
            family: Family::DallE,
            flexible_sizes: None,
            auto_size: false,
            gpt_qualities: vec![],
            max_prompt_chars: 4000,
            max_n: 1,
            sizes: vec![
                Size::new(1024, 1024),
                Size::new(1792, 1024),
                Size::new(1024, 1792),
            ],
            default_size: DEFAULT_SIZE,
            qualities: vec![Quality::Standard, Quality::Hd],
            styles: vec![Style::Vivid, Style::Natural],
            revised_prompt: true,
        }
    }

    /// GPT image models with free sizes (gpt-image-2): prompt ≤ 32000 chars, n 1..=10,
    /// `WxH` within [`FlexibleSizes::GPT_IMAGE_2`] or `auto`, quality low..high or auto.
    pub fn gpt_image() -> Self {
        ModelRules {
            family: Family::GptImage,
            flexible_sizes: Some(FlexibleSizes::GPT_IMAGE_2),
            auto_size: true,
            gpt_qualities: vec![
                GptQuality::Low,
                GptQuality::Medium,
                GptQuality::High,
                GptQuality::Auto,
            ],
            max_prompt_chars: 32000,
            max_n: 10,
            sizes: vec![
                Size::new(1024, 1024),
                Size::new(1536, 1024),
                Size::new(1024, 1536),
            ],
            default_size: DEFAULT_SIZE,
            qualities: vec![],
            styles: vec![],
            revised_prompt: false,
        }
    }

    /// gpt-image-2.5-*: as gpt-image-2, plus quality xhigh and max.
    pub fn gpt_image_25() -> Self {
        let mut r = Self::gpt_image();
        r.gpt_qualities.extend([GptQuality::Xhigh, GptQuality::Max]);
        r
    }

    /// gpt-image-1-mini and gpt-image-1.5: the three standard sizes (or auto) only.
    pub fn gpt_image_fixed() -> Self {
        ModelRules {
            flexible_sizes: None,
            ..Self::gpt_image()
        }
    }

    pub fn preset(name: &str) -> Option<Self> {
        match name {
            "dall-e-2" => Some(Self::dalle2()),
            "dall-e-3" => Some(Self::dalle3()),
            "gpt-image" | "gpt-image-2" => Some(Self::gpt_image()),
            "gpt-image-2.5" => Some(Self::gpt_image_25()),
            "gpt-image-1.5" | "gpt-image-1-mini" => Some(Self::gpt_image_fixed()),
            _ => None,
        }
    }

    pub const PRESETS: &'static [&'static str] = &[
        "dall-e-2",
        "dall-e-3",
        "gpt-image",
        "gpt-image-2",
        "gpt-image-2.5",
        "gpt-image-1.5",
        "gpt-image-1-mini",
    ];
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_parses_and_prints() {
        let s: Size = "1792x1024".parse().unwrap();
        assert_eq!(s, Size::new(1792, 1024));
        assert_eq!(s.to_string(), "1792x1024");
        for bad in [
            "",
            "1024",
            "1024x",
            "x1024",
            "0x10",
            "10x0",
            "-1x5",
            "1024X1024",
            "1e3x10",
            "999999x1",
        ] {
            assert!(bad.parse::<Size>().is_err(), "{bad} should not parse");
        }
    }

    #[test]
    fn presets_match_the_contract() {
        let d2 = ModelRules::preset("dall-e-2").unwrap();
        assert_eq!(d2.max_prompt_chars, 1000);
        assert_eq!(d2.max_n, 10);
        let d3 = ModelRules::preset("dall-e-3").unwrap();
        assert_eq!(d3.max_prompt_chars, 4000);
        assert_eq!(d3.max_n, 1);
        assert!(d3.sizes.contains(&Size::new(1024, 1792)));
        assert!(!d2.sizes.contains(&Size::new(1792, 1024)));
        assert!(ModelRules::preset("dall-e-4").is_none());
    }

    #[test]
    fn flexible_sizes_follow_gpt_image_2() {
        let f = FlexibleSizes::GPT_IMAGE_2;
        for ok in [
            "1024x1024",
            "1536x864",
            "1792x1024",
            "1024x1792",
            "3840x2160",
            "816x816",
        ] {
            let size: Size = ok.parse().unwrap();
            assert!(f.check(size).is_ok(), "{ok}");
            assert_eq!(
                (size.text(), size.to_string()),
                (ok.to_string(), ok.to_string())
            );
        }
        for bad in [
            "1000x1000",
            "3072x1008",
            "4096x1024",
            "512x512",
            "256x256",
            "3856x2160",
        ] {
            assert!(f.check(bad.parse().unwrap()).is_err(), "{bad}");
        }
        assert_eq!(f.smallest_like(Size::new(512, 512)), Size::new(816, 816));
        assert_eq!(f.smallest_like(Size::new(256, 256)), Size::new(816, 816));
        assert_eq!(
            f.smallest_like(Size::new(1024, 1024)),
            Size::new(1024, 1024)
        );
    }
}
