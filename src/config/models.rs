//! The `models:` section of gateway.yaml: each model's rules, prices, timeout and route (its
//! targets, with the DALL·E -> GPT image translation of each).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::types::*;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// A preset name (`dall-e-2`, `dall-e-3`) or custom rules.
    pub rules: RulesConfig,
    pub route: RouteConfig,
    /// Overall deadline of one request to this model.
    #[serde(default = "default_model_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
    /// What an image costs the client: a preset (`dall-e-2`, `dall-e-3`) or a table; default:
    /// the preset of the model's rules, else free.
    #[serde(default)]
    pub price: Option<PriceConfig>,
    /// What an image costs us upstream (same syntax as `price`, plus token prices), for the
    /// margin in the usage ledger; default: free.
    #[serde(default)]
    pub upstream_price: Option<PriceConfig>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum PriceConfig {
    Preset(String),
    Table(PriceTableConfig),
}

#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct PriceTableConfig {
    #[serde(default)]
    pub per_image: Vec<PriceEntry>,
    /// Price of a size/quality not in the table.
    #[serde(default)]
    pub default_micro_usd: u64,
    /// Token prices (GPT image `usage`), micro-dollars per million tokens, as the provider
    /// publishes them; when the upstream reports usage and any is set, they replace the
    /// per-image price (which then only sizes the budget hold).
    #[serde(default)]
    pub text_input_per_million: u64,
    #[serde(default)]
    pub image_input_per_million: u64,
    #[serde(default)]
    pub text_output_per_million: u64,
    #[serde(default)]
    pub image_output_per_million: u64,
    /// Shorthands: one rate for text and image input (output) tokens alike.
    #[serde(default)]
    pub input_tokens_per_million: u64,
    #[serde(default)]
    pub output_tokens_per_million: u64,
}

impl PriceConfig {
    /// What is wrong with a price for a model with these rules (sizes that do not parse,
    /// qualities its family does not have, a preset that is not `free`).
    pub fn problems(&self, rules: &crate::api::ModelRules) -> Vec<String> {
        let table = match self {
            PriceConfig::Preset(p) if p == "free" => return vec![],
            PriceConfig::Preset(p) => {
                return vec![format!(
                    "\"{p}\" is not a price (write a table, `free`, or a catalog model's name \
                     in gateway.yaml)"
                )]
            }
            PriceConfig::Table(t) => t,
        };
        let mut out = Vec::new();
        for (i, e) in table.per_image.iter().enumerate() {
            if let Err(why) = e.size.parse::<crate::api::Size>() {
                out.push(format!("per_image[{i}].size: {why}"));
            }
            if let Some(q) = &e.quality {
                let known = match rules.family {
                    crate::api::Family::DallE => crate::api::Quality::parse(q).is_some(),
                    crate::api::Family::GptImage => crate::api::GptQuality::parse(q).is_some(),
                };
                if !known {
                    out.push(format!(
                        "per_image[{i}].quality: \"{q}\" is not a {} quality",
                        rules.family
                    ));
                }
            }
        }
        out
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct PriceEntry {
    pub size: String,
    /// `standard` or `hd`; absent matches any.
    #[serde(default)]
    pub quality: Option<String>,
    pub micro_usd: u64,
}

fn default_model_timeout() -> Duration {
    Duration::from_secs(120)
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum RulesConfig {
    Preset(String),
    Custom(Box<CustomRules>),
}

/// Custom rules, optionally starting from a preset and overriding some fields.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomRules {
    #[serde(default)]
    pub preset: Option<String>,
    #[serde(default)]
    pub sizes: Option<Vec<String>>,
    #[serde(default)]
    pub default_size: Option<String>,
    #[serde(default)]
    pub max_n: Option<u32>,
    #[serde(default)]
    pub max_prompt_chars: Option<usize>,
    /// Accepted `quality` values; empty rejects the field.
    #[serde(default)]
    pub quality: Option<Vec<String>>,
    /// Accepted `style` values; empty rejects the field.
    #[serde(default)]
    pub style: Option<Vec<String>>,
    #[serde(default)]
    pub revised_prompt: Option<bool>,
    /// `dall-e` (the contract's fields) or `gpt-image`; default: the preset's, else dall-e.
    #[serde(default)]
    pub family: Option<String>,
    /// GPT image sizes beyond `sizes`: any WxH on this grid (`null`: none, over a preset
    /// that has one).
    #[serde(default, deserialize_with = "nullable")]
    pub size_grid: Option<Option<SizeGridConfig>>,
    /// `size: auto` accepted.
    #[serde(default)]
    pub auto_size: Option<bool>,
    #[serde(default)]
    pub output_format: Option<Vec<String>>,
    #[serde(default)]
    pub background: Option<Vec<String>>,
    #[serde(default)]
    pub input_fidelity: Option<Vec<String>>,
    #[serde(default)]
    pub markup: Option<bool>,
    #[serde(default)]
    pub complexity: Option<bool>,
    #[serde(default)]
    pub stream: Option<bool>,
    /// `refuse` or `pass` (to a gpt-image upstream, unchanged).
    #[serde(default)]
    pub unknown_fields: Option<String>,
    /// Of generation, edit, variation.
    #[serde(default)]
    pub operations: Option<Vec<String>>,
}

/// A field that may be absent (`None`), `null` (`Some(None)`) or given.
fn nullable<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SizeGridConfig {
    pub multiple: u32,
    pub max_aspect: u32,
    pub max_edge: u32,
    pub min_pixels: u64,
    pub max_pixels: u64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    #[serde(default)]
    pub strategy: Strategy,
    /// Upstream calls one request may make (each to a different target); default: up to 3,
    /// never more than the number of targets.
    #[serde(default)]
    pub max_attempts: Option<u32>,
    /// Which upstream failures move the request to another target.
    #[serde(default = "default_retry_on")]
    pub retry_on: Vec<RetryOn>,
    pub targets: Vec<TargetConfig>,
    /// Other targets for some tenants (by id or labels), first match wins.
    #[serde(default)]
    pub overrides: Vec<RouteOverride>,
}

/// Targets a route uses for the tenants it selects: those named in `tenants` (if any) that
/// have every label in `labels` (if any).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteOverride {
    #[serde(default)]
    pub tenants: Vec<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub targets: Vec<TargetConfig>,
    #[serde(default)]
    pub strategy: Option<Strategy>,
    #[serde(default)]
    pub max_attempts: Option<u32>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Random by weight within the best available tier.
    #[default]
    Weighted,
    /// Power of two choices (drawn by weight) on in-flight requests.
    LeastOutstanding,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum RetryOn {
    /// Connection refused, reset, DNS failure.
    Connect,
    /// No answer within the backend's timeout.
    Timeout,
    /// Upstream 429.
    RateLimited,
    /// Upstream 5xx or an unusable answer.
    ServerError,
    /// Upstream 401/403 (our credentials for that backend).
    UpstreamAuth,
}

fn default_retry_on() -> Vec<RetryOn> {
    vec![
        RetryOn::Connect,
        RetryOn::Timeout,
        RetryOn::RateLimited,
        RetryOn::ServerError,
    ]
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    pub backend: String,
    /// Model name sent upstream (Azure: the deployment); defaults to the public name.
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Tier: lower first.
    #[serde(default)]
    pub priority: u32,
    /// The dialect the upstream speaks (openai/azure backends): `dall-e` or `gpt-image`.
    #[serde(default)]
    pub dialect: Dialect,
    /// How DALL·E requests are translated for a `gpt-image` upstream.
    #[serde(default)]
    pub translation: TranslationConfig,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
pub enum Dialect {
    /// The contract's fields (OpenAI-compatible servers that still accept DALL·E requests).
    #[default]
    #[serde(rename = "dall-e")]
    DallE,
    /// The GPT image dialect: no response_format or style, always base64.
    #[serde(rename = "gpt-image")]
    GptImage,
}

/// DALL·E -> GPT image translation rules of one target.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TranslationConfig {
    /// GPT image quality for DALL·E `standard` and `hd`.
    #[serde(default = "default_quality_map")]
    pub quality: BTreeMap<String, String>,
    /// Sentences appended to the prompt for DALL·E `vivid` and `natural`.
    #[serde(default)]
    pub style: StyleSentences,
    /// Send `user` as is in `safety_identifier` (default: its SHA-256, so end-user ids stay
    /// inside the gateway).
    #[serde(default)]
    pub pass_user: bool,
    /// Images per upstream call; larger `n` is split into parallel calls.
    #[serde(default = "default_translation_max_n")]
    pub max_n: u32,
    /// Sizes the upstream accepts; default: gpt-image-2's free sizes (16-pixel grid, aspect
    /// up to 3:1, 655,360 to 8,294,400 pixels, edges up to 3840).
    #[serde(default)]
    pub sizes: Option<Vec<String>>,
    /// What a variation asks of a GPT image upstream, which has no variations: an edit of the
    /// image with this prompt.
    #[serde(default = "default_variation_prompt")]
    pub variation_prompt: String,
}

fn default_variation_prompt() -> String {
    "A variation of this image: the same subject, composition and style, with small \
     differences in its details."
        .to_string()
}

impl Default for TranslationConfig {
    fn default() -> Self {
        TranslationConfig {
            quality: default_quality_map(),
            style: StyleSentences::default(),
            pass_user: false,
            max_n: default_translation_max_n(),
            sizes: None,
            variation_prompt: default_variation_prompt(),
        }
    }
}

fn default_quality_map() -> BTreeMap<String, String> {
    [("standard", "medium"), ("hd", "high")]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn default_translation_max_n() -> u32 {
    10
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StyleSentences {
    #[serde(default = "default_vivid_sentence")]
    pub vivid: String,
    #[serde(default = "default_natural_sentence")]
    pub natural: String,
}

impl Default for StyleSentences {
    fn default() -> Self {
        StyleSentences {
            vivid: default_vivid_sentence(),
            natural: default_natural_sentence(),
        }
    }
}

fn default_vivid_sentence() -> String {
    "Style: vivid, hyper-real and dramatic, with rich saturated colors.".to_string()
}

fn default_natural_sentence() -> String {
    "Style: natural, realistic and true to life, with soft natural light.".to_string()
}

fn default_weight() -> u32 {
    1
}
