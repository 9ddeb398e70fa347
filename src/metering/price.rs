//! Prices: what an image costs, in integer micro-dollars: per image by size and quality, and
//! per million tokens (text and image input, text and image output, each at its own rate)
//! where an upstream reports `usage`. Tables come from the model catalog or the config.
//!
//! Rounding: a token-priced request costs the sum over the four kinds of `tokens x rate`
//! (rates in micro-dollars per million tokens), divided by one million and rounded up once,
//! to the whole micro-dollar. A per-image price for a size the table does not list scales the
//! table's 1024x1024 price of the same quality by the pixel count, rounded up.

use crate::api::{Family, ImageRequest, Quality, Size};
use crate::config::{Catalog, PriceConfig, PriceTableConfig, RulesConfig};

/// Micro-dollars per million tokens of each kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenRates {
    pub text_input: u64,
    pub image_input: u64,
    pub text_output: u64,
    pub image_output: u64,
}

/// An upstream's `usage`, split by kind. Without `input_tokens_details` every input token
/// counts as text; without `output_tokens_details` every output token counts as image; tokens
/// a total has beyond its details count as text (input) or image (output).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenUsage {
    pub text_input: u64,
    pub image_input: u64,
    pub text_output: u64,
    pub image_output: u64,
}

impl TokenUsage {
    pub fn from_json(usage: &serde_json::Value) -> Option<Self> {
        let n = |v: Option<&serde_json::Value>| v.and_then(|v| v.as_u64());
        let input = n(usage.get("input_tokens"));
        let output = n(usage.get("output_tokens"));
        if input.is_none() && output.is_none() {
            return None;
        }
        let split = |total: Option<u64>, details: Option<&serde_json::Value>| {
            let text = n(details.and_then(|d| d.get("text_tokens")));
            let image = n(details.and_then(|d| d.get("image_tokens")));
            let (text, image) = (text.unwrap_or(0), image.unwrap_or(0));
            let rest = total.unwrap_or(0).saturating_sub(text + image);
            (text, image, rest)
        };
        let (ti, ii, irest) = split(input, usage.get("input_tokens_details"));
        let (to, io, orest) = split(output, usage.get("output_tokens_details"));
        Some(TokenUsage {
            text_input: ti + irest,
            image_input: ii,
            text_output: to,
            image_output: io + orest,
        })
    }
}

impl TokenRates {
    /// The cost of `usage`, rounded up once to the micro-dollar.
    pub fn cost(&self, u: &TokenUsage) -> u64 {
        let sum = u128::from(u.text_input) * u128::from(self.text_input)
            + u128::from(u.image_input) * u128::from(self.image_input)
            + u128::from(u.text_output) * u128::from(self.text_output)
            + u128::from(u.image_output) * u128::from(self.image_output);
        u64::try_from(sum.div_ceil(1_000_000)).unwrap_or(u64::MAX)
    }
}

/// Per-image prices in micro-dollars, and token rates where the price is token-based.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PriceTable {
    /// (size, quality) -> price; a `None` quality matches any.
    entries: crate::FastMap<(Size, Option<&'static str>), u64>,
    default: u64,
    tokens: Option<TokenRates>,
}

/// A quality's wire name as a `'static` key (DALL·E and GPT image values alike).
fn quality_key(q: &str) -> Option<&'static str> {
    Quality::parse(q)
        .map(Quality::as_str)
        .or_else(|| crate::api::GptQuality::parse(q).map(|g| g.as_str()))
}

impl PriceTable {
    /// A table as a catalog entry or gateway.yaml writes it (checked by the config already;
    /// an entry that still does not parse is an error here).
    pub fn from_config(t: &PriceTableConfig) -> Result<Self, String> {
        let mut entries = crate::FastMap::default();
        for e in &t.per_image {
            let size: Size = e.size.parse()?;
            let quality = match &e.quality {
                Some(q) => Some(quality_key(q).ok_or_else(|| format!("unknown quality \"{q}\""))?),
                None => None,
            };
            entries.insert((size, quality), e.micro_usd);
        }
        let or = |specific: u64, shorthand: u64| if specific > 0 { specific } else { shorthand };
        let rates = TokenRates {
            text_input: or(t.text_input_per_million, t.input_tokens_per_million),
            image_input: or(t.image_input_per_million, t.input_tokens_per_million),
            text_output: or(t.text_output_per_million, t.output_tokens_per_million),
            image_output: or(t.image_output_per_million, t.output_tokens_per_million),
        };
        Ok(PriceTable {
            entries,
            default: t.default_micro_usd,
            tokens: (rates != TokenRates::default()).then_some(rates),
        })
    }

    /// A model's client price: its `price` (a table, `free`, or a catalog model's name), else
    /// its catalog entry's. A model with neither is refused, so nothing is billed at $0 by
    /// accident.
    pub fn for_model(
        price: Option<&PriceConfig>,
        rules: &RulesConfig,
        catalog: &Catalog,
    ) -> Result<Self, String> {
        match price {
            Some(p) => Self::explicit(p, catalog),
            None => match rules.entry(catalog).and_then(|e| e.price.as_ref()) {
                Some(p) => Self::explicit(p, catalog),
                None => Err("the model has no price in the catalog: set `price:` (a table, a catalog model's \
                             name, or `free`)"
                    .into()),
            },
        }
    }

    /// An explicit price: a table, `free`, or a catalog model's name.
    pub fn explicit(price: &PriceConfig, catalog: &Catalog) -> Result<Self, String> {
        match price {
            PriceConfig::Table(t) => Self::from_config(t),
            PriceConfig::Preset(name) if name == "free" => Ok(Self::default()),
            PriceConfig::Preset(name) => match catalog.get(name).and_then(|e| e.price.as_ref()) {
                Some(PriceConfig::Table(t)) => Self::from_config(t),
                Some(PriceConfig::Preset(p)) if p == "free" => Ok(Self::default()),
                _ => Err(format!(
                    "\"{name}\" is not a price: write a table, `free`, or a catalog model's name"
                )),
            },
        }
    }

    pub fn token_rates(&self) -> Option<TokenRates> {
        self.tokens
    }

    /// The price of one image of `size` at `quality` (a wire name; `None`: any).
    pub fn per_image(&self, size: Size, quality: Option<&'static str>) -> u64 {
        let exact = |size: Size| {
            quality
                .and_then(|q| self.entries.get(&(size, Some(q))))
                .or_else(|| self.entries.get(&(size, None)))
                .copied()
        };
        if let Some(p) = exact(size) {
            return p;
        }
        let square = Size::new(1024, 1024);
        match exact(square) {
            Some(p) if size != square => {
                let pixels = u128::from(size.width) * u128::from(size.height);
                u64::try_from((u128::from(p) * pixels).div_ceil(1024 * 1024)).unwrap_or(u64::MAX)
            }
            _ => self.default,
        }
    }

    /// The quality a request is priced at: DALL·E `standard` unless given; a GPT image
    /// `auto` at `medium` (what answers report for it).
    fn quality_of(request: &ImageRequest) -> &'static str {
        match &request.gpt {
            Some(g) if request.family() == Family::GptImage => match g.quality {
                crate::api::GptQuality::Auto => "medium",
                q => q.as_str(),
            },
            _ => request.quality.unwrap_or(Quality::Standard).as_str(),
        }
    }

    /// What `images` images of this request cost per image (the budget hold; answers without
    /// usage).
    pub fn estimate(&self, request: &ImageRequest, images: u32) -> u64 {
        self.per_image(request.size, Some(Self::quality_of(request))) * u64::from(images)
    }

    /// What the request costs: from the upstream's token counts when the table has token
    /// rates and the answer has usage, else per image.
    pub fn cost(
        &self,
        request: &ImageRequest,
        images: u32,
        usage: Option<&serde_json::Value>,
    ) -> u64 {
        match (self.tokens, usage.and_then(TokenUsage::from_json)) {
            (Some(rates), Some(u)) => rates.cost(&u),
            _ => self.estimate(request, images),
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

    fn table(name: &str) -> PriceTable {
        let catalog = Catalog::builtin();
        PriceTable::for_model(None, &RulesConfig::Preset(name.into()), &catalog).unwrap()
    }

    #[test]
    fn every_dalle_size_and_quality_has_openais_price() {
        let d2 = table("dall-e-2");
        for (size, price) in [
            ((256, 256), 16_000),
            ((512, 512), 18_000),
            ((1024, 1024), 20_000),
        ] {
            let size = Size::new(size.0, size.1);
            assert_eq!(d2.per_image(size, None), price);
            assert_eq!(d2.per_image(size, Some("standard")), price);
        }
        let d3 = table("dall-e-3");
        for (size, q, price) in [
            ((1024, 1024), "standard", 40_000),
            ((1792, 1024), "standard", 80_000),
            ((1024, 1792), "standard", 80_000),
            ((1024, 1024), "hd", 80_000),
            ((1792, 1024), "hd", 120_000),
            ((1024, 1792), "hd", 120_000),
        ] {
            assert_eq!(
                d3.per_image(Size::new(size.0, size.1), Some(q)),
                price,
                "{size:?} {q}"
            );
        }
        assert_eq!(
            PriceTable::default().per_image(Size::new(512, 512), None),
            0
        );
    }

    #[test]
    fn tokens_are_priced_by_kind_and_rounded_up_once() {
        // gpt-image-2: text in $5/M, image in $8/M, text out $10/M, image out $30/M.
        let rates = table("gpt-image-2").token_rates().unwrap();
        let usage = serde_json::json!({
            "input_tokens": 50, "input_tokens_details": {"text_tokens": 10, "image_tokens": 40},
            "output_tokens": 4161, "output_tokens_details": {"text_tokens": 1, "image_tokens": 4160},
            "total_tokens": 4211
        });
        let u = TokenUsage::from_json(&usage).unwrap();
        // 10x5 + 40x8 + 1x10 + 4160x30 = 50 + 320 + 10 + 124,800 = 125,180 micro-dollars.
        assert_eq!(rates.cost(&u), 125_180);
        // One token of text input is 5 micro-dollars; 1 token at $0.50/M rounds up to 1.
        let half = TokenRates {
            text_input: 500_000,
            ..TokenRates::default()
        };
        let one = TokenUsage {
            text_input: 1,
            ..TokenUsage::default()
        };
        assert_eq!(half.cost(&one), 1);
        let three = TokenUsage {
            text_input: 3,
            ..TokenUsage::default()
        };
        assert_eq!(
            half.cost(&three),
            2,
            "1.5 rounds up to 2, once, not per kind"
        );
        // Without details, input counts as text and output as image.
        let bare =
            TokenUsage::from_json(&serde_json::json!({"input_tokens": 7, "output_tokens": 9}))
                .unwrap();
        assert_eq!((bare.text_input, bare.image_output), (7, 9));
    }

    #[test]
    fn unlisted_sizes_scale_the_square_price_by_pixels() {
        let g = table("gpt-image-2");
        assert_eq!(g.per_image(Size::new(1024, 1024), Some("high")), 211_000);
        // 2048x2048 is four times the pixels.
        assert_eq!(g.per_image(Size::new(2048, 2048), Some("high")), 844_000);
    }

    #[test]
    fn a_model_without_a_price_is_refused_unless_free() {
        let catalog = Catalog::builtin();
        let custom = RulesConfig::Custom(Default::default());
        assert!(PriceTable::for_model(None, &custom, &catalog).is_err());
        let free = PriceConfig::Preset("free".into());
        assert_eq!(
            PriceTable::for_model(Some(&free), &custom, &catalog).unwrap(),
            PriceTable::default()
        );
        let named = PriceConfig::Preset("dall-e-3".into());
        let t = PriceTable::for_model(Some(&named), &custom, &catalog).unwrap();
        assert_eq!(t.per_image(Size::new(1024, 1024), Some("hd")), 80_000);
    }
}
