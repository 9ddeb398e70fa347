//! Prices: what an image costs, per model x size x quality in integer micro-dollars (presets
//! for dall-e-2 and dall-e-3 at OpenAI's published prices, or a table from the config), and
//! per million tokens where an upstream reports them.

use crate::api::{ImageRequest, Quality, Size};
use crate::config::{PriceConfig, RulesConfig};

/// Per-image prices in micro-dollars.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PriceTable {
    /// (size, quality) -> price; a `None` quality matches any.
    entries: crate::FastMap<(Size, Option<Quality>), u64>,
    default: u64,
    /// Micro-dollars per million input / output tokens (upstream tables).
    tokens: Option<(u64, u64)>,
}

const fn s(w: u32, h: u32) -> Size {
    Size::new(w, h)
}

impl PriceTable {
    /// OpenAI's published prices.
    pub fn preset(name: &str) -> Option<Self> {
        let entries: Vec<((Size, Option<Quality>), u64)> = match name {
            "dall-e-2" => vec![
                ((s(256, 256), None), 16_000),
                ((s(512, 512), None), 18_000),
                ((s(1024, 1024), None), 20_000),
            ],
            "dall-e-3" => vec![
                ((s(1024, 1024), Some(Quality::Standard)), 40_000),
                ((s(1792, 1024), Some(Quality::Standard)), 80_000),
                ((s(1024, 1792), Some(Quality::Standard)), 80_000),
                ((s(1024, 1024), Some(Quality::Hd)), 80_000),
                ((s(1792, 1024), Some(Quality::Hd)), 120_000),
                ((s(1024, 1792), Some(Quality::Hd)), 120_000),
            ],
            _ => return None,
        };
        Some(PriceTable {
            entries: entries.into_iter().collect(),
            default: 0,
            tokens: None,
        })
    }

    /// A model's table: its `price`, else the preset of its rules, else free.
    pub fn for_model(price: Option<&PriceConfig>, rules: &RulesConfig) -> Result<Self, String> {
        match price {
            Some(PriceConfig::Preset(name)) => {
                Self::preset(name).ok_or_else(|| format!("unknown price preset \"{name}\""))
            }
            Some(PriceConfig::Table(t)) => {
                let mut entries = crate::FastMap::default();
                for e in &t.per_image {
                    let size: Size = e.size.parse()?;
                    let quality = match &e.quality {
                        Some(q) => Some(
                            Quality::parse(q).ok_or_else(|| format!("unknown quality \"{q}\""))?,
                        ),
                        None => None,
                    };
                    entries.insert((size, quality), e.micro_usd);
                }
                let tokens = (t.input_tokens_per_million > 0 || t.output_tokens_per_million > 0)
                    .then_some((t.input_tokens_per_million, t.output_tokens_per_million));
                Ok(PriceTable {
                    entries,
                    default: t.default_micro_usd,
                    tokens,
                })
            }
            None => Ok(match rules {
                RulesConfig::Preset(name) => Self::preset(name).unwrap_or_default(),
                RulesConfig::Custom(c) => c
                    .preset
                    .as_deref()
                    .and_then(Self::preset)
                    .unwrap_or_default(),
            }),
        }
    }

    pub fn per_image(&self, size: Size, quality: Option<Quality>) -> u64 {
        let quality = quality.unwrap_or(Quality::Standard);
        self.entries
            .get(&(size, Some(quality)))
            .or_else(|| self.entries.get(&(size, None)))
            .copied()
            .unwrap_or(self.default)
    }

    /// The cost of `images` images of this request.
    pub fn cost(&self, request: &ImageRequest, images: u32) -> u64 {
        self.per_image(request.size, request.quality) * u64::from(images)
    }

    /// The cost with the upstream's token counts when the table has token prices, else per
    /// image (rounded up to the micro-dollar).
    pub fn cost_with_tokens(
        &self,
        request: &ImageRequest,
        images: u32,
        tokens: (Option<i64>, Option<i64>),
    ) -> u64 {
        match (self.tokens, tokens) {
            (Some((pi, po)), (i, o)) if i.is_some() || o.is_some() => {
                let t = |n: Option<i64>, p: u64| n.unwrap_or(0).max(0) as u128 * p as u128;
                (t(i, pi) + t(o, po)).div_ceil(1_000_000) as u64
            }
            _ => self.cost(request, images),
        }
    }
}

/// `input_tokens` and `output_tokens` of a GPT image `usage` object.
pub fn usage_tokens(usage: Option<&serde_json::Value>) -> (Option<i64>, Option<i64>) {
    let get = |k: &str| usage.and_then(|u| u.get(k)).and_then(|v| v.as_i64());
    (get("input_tokens"), get("output_tokens"))
}

/// `$0.040000`, as the budget messages write money.
pub fn dollars(micro: u64) -> String {
    format!("${}.{:06}", micro / 1_000_000, micro % 1_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_dalle_size_and_quality_has_openais_price() {
        let d2 = PriceTable::preset("dall-e-2").unwrap();
        for (size, price) in [
            ((256, 256), 16_000),
            ((512, 512), 18_000),
            ((1024, 1024), 20_000),
        ] {
            let size = s(size.0, size.1);
            assert_eq!(d2.per_image(size, None), price);
            assert_eq!(d2.per_image(size, Some(Quality::Standard)), price);
        }
        let d3 = PriceTable::preset("dall-e-3").unwrap();
        for (size, q, price) in [
            ((1024, 1024), Quality::Standard, 40_000),
            ((1792, 1024), Quality::Standard, 80_000),
            ((1024, 1792), Quality::Standard, 80_000),
            ((1024, 1024), Quality::Hd, 80_000),
            ((1792, 1024), Quality::Hd, 120_000),
            ((1024, 1792), Quality::Hd, 120_000),
        ] {
            assert_eq!(
                d3.per_image(s(size.0, size.1), Some(q)),
                price,
                "{size:?} {q}"
            );
        }
        assert_eq!(PriceTable::default().per_image(s(512, 512), None), 0);
    }
}
