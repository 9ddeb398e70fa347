//! Per-model request rules: what each field may be. Named models take theirs from the catalog
//! (`catalog/models.yaml`, built in, extended from gateway.yaml); a local model such as `sdxl`
//! declares its own in gateway.yaml.

use std::fmt;
use std::str::FromStr;

use super::edit::Operation;

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
    ($(#[$doc:meta])* $name:ident { $($variant:ident => $wire:literal),+ $(,)? }) => {
        $(#[$doc])*
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
wire_enum!(OutputFormat { Png => "png", Jpeg => "jpeg", Webp => "webp", Gif => "gif", Svg => "svg" });
wire_enum!(InputFidelity { High => "high", Low => "low" });
wire_enum!(Moderation { Low => "low", Auto => "auto" });
wire_enum!(Complexity { Low => "low", Medium => "medium", High => "high" });
wire_enum!(Style { Vivid => "vivid", Natural => "natural" });
wire_enum!(ResponseFormat { Url => "url", B64Json => "b64_json" });

wire_enum!(
    /// Which dialect of the Images API a public model speaks at the edge: the contract's
    /// (dall-e-2/dall-e-3 fields, `response_format`, `style`) or the GPT image models' (always
    /// base64, `background`, `output_format`, streaming, usage).
    Family { DallE => "dall-e", GptImage => "gpt-image" });

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
/// Named models get theirs from the catalog (`catalog/models.yaml`); [`ModelRules::base`]
/// is where a family's entry starts.
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
    /// GPT image models: accepted `output_format` values (`gif` and `svg` bring their own
    /// fields: `frame_count`, `frame_duration_ms`; `svg`).
    pub output_formats: Vec<OutputFormat>,
    /// GPT image models: accepted `background` values (empty: the field is refused).
    pub backgrounds: Vec<Background>,
    /// Edits: accepted `input_fidelity` values (empty: the field is refused).
    pub input_fidelity: Vec<InputFidelity>,
    /// Edits: a `markup` image is accepted.
    pub markup: bool,
    /// `complexity` is accepted.
    pub complexity: bool,
    /// `stream` (and `partial_images`) are accepted.
    pub stream: bool,
    /// What happens to a request field the gateway does not know.
    pub unknown_fields: UnknownFields,
    /// What the model does. A variation is also served by a model that edits (as an edit).
    pub operations: Vec<Operation>,
}

pub const DEFAULT_SIZE: Size = Size::new(1024, 1024);

wire_enum!(
    /// A request field the gateway does not know (yet): `refuse`d with a 400 naming it (the
    /// DALL·E contract, local models), or `pass`ed to a `gpt-image` upstream unchanged (and
    /// refused by backends that cannot honour it).
    UnknownFields { Refuse => "refuse", Pass => "pass" });

impl ModelRules {
    /// Where a family's rules start before a catalog entry or the config changes them.
    /// DALL·E: the contract's defaults (prompt <= 1000, n = 1, sizes to be given). GPT image:
    /// the fields every GPT image model shares (prompt <= 32000, n 1..=10, the three standard
    /// sizes or auto, quality low..high or auto, png/jpeg/webp, streaming).
    pub fn base(family: Family) -> Self {
        match family {
            Family::DallE => ModelRules {
                family,
                flexible_sizes: None,
                auto_size: false,
                gpt_qualities: vec![],
                max_prompt_chars: 1000,
                max_n: 1,
                sizes: vec![],
                default_size: DEFAULT_SIZE,
                qualities: vec![],
                styles: vec![],
                revised_prompt: false,
                output_formats: vec![],
                backgrounds: vec![],
                input_fidelity: vec![],
                markup: false,
                complexity: false,
                stream: false,
                unknown_fields: UnknownFields::Refuse,
                operations: vec![Operation::Generation, Operation::Edit, Operation::Variation],
            },
            Family::GptImage => ModelRules {
                family,
                flexible_sizes: None,
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
                output_formats: vec![OutputFormat::Png, OutputFormat::Jpeg, OutputFormat::Webp],
                backgrounds: Background::ALL.to_vec(),
                input_fidelity: vec![],
                markup: false,
                complexity: true,
                stream: true,
                unknown_fields: UnknownFields::Pass,
                operations: vec![Operation::Generation, Operation::Edit],
            },
        }
    }

    /// dall-e-2, the contract every variation follows whatever model serves it: prompt <=
    /// 1000 chars, n 1..=10, three square sizes, `quality: standard` only, no style.
    pub fn dalle2() -> Self {
        ModelRules {
            max_n: 10,
            sizes: vec![
                Size::new(256, 256),
                Size::new(512, 512),
                Size::new(1024, 1024),
            ],
            qualities: vec![Quality::Standard],
            ..Self::base(Family::DallE)
        }
    }

    /// Whether the model serves `op` (a variation: natively, or as an edit).
    pub fn serves(&self, op: Operation) -> bool {
        self.operations.contains(&op)
            || (op == Operation::Variation && self.operations.contains(&Operation::Edit))
    }

    /// Contradictions within the rules, each as a message.
    pub fn contradictions(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.sizes.is_empty() && self.flexible_sizes.is_none() {
            out.push("the model accepts no size (give `sizes` or `size_grid`)".to_string());
        }
        if !self.sizes.contains(&self.default_size)
            && self
                .flexible_sizes
                .is_none_or(|f| f.check(self.default_size).is_err())
        {
            out.push(format!(
                "default_size {} is not one of the model's sizes",
                self.default_size
            ));
        }
        if let Some(f) = &self.flexible_sizes {
            for s in &self.sizes {
                if let Err(why) = f.check(*s) {
                    out.push(format!("size {s} is outside the size grid: {why}"));
                }
            }
        }
        if self.unknown_fields == UnknownFields::Pass && self.family == Family::DallE {
            out.push("`unknown_fields: pass` needs family gpt-image".into());
        }
        if self.operations.is_empty() {
            out.push("`operations` must list at least one of generation, edit, variation".into());
        }
        match self.family {
            Family::DallE => {
                for (field, set) in [
                    ("output_format", !self.output_formats.is_empty()),
                    ("background", !self.backgrounds.is_empty()),
                    ("input_fidelity", !self.input_fidelity.is_empty()),
                    ("markup", self.markup),
                    ("complexity", self.complexity),
                    ("stream", self.stream),
                    ("size_grid", self.flexible_sizes.is_some()),
                    ("auto_size", self.auto_size),
                ] {
                    if set {
                        out.push(format!(
                            "`{field}` is a GPT image field; a dall-e model takes none"
                        ));
                    }
                }
            }
            Family::GptImage => {
                if !self.styles.is_empty() {
                    out.push("GPT image models take no style".into());
                }
                if self.output_formats.is_empty() {
                    out.push("`output_format` must list at least one format".into());
                }
                if self.gpt_qualities.is_empty() {
                    out.push("`quality` must list at least one value for a GPT image model".into());
                }
                if self.revised_prompt {
                    out.push("GPT image models give no revised_prompt".into());
                }
            }
        }
        out
    }
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
