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
        write!(f, "{}x{}", self.width, self.height)
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
wire_enum!(Style { Vivid => "vivid", Natural => "natural" });
wire_enum!(ResponseFormat { Url => "url", B64Json => "b64_json" });

/// What a model accepts. `qualities`/`styles` empty means the field is rejected outright.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelRules {
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

    pub fn preset(name: &str) -> Option<Self> {
        match name {
            "dall-e-2" => Some(Self::dalle2()),
            "dall-e-3" => Some(Self::dalle3()),
            _ => None,
        }
    }

    pub const PRESETS: &'static [&'static str] = &["dall-e-2", "dall-e-3"];
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
}
