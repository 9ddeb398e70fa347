//! The ops console's tenant and key pages: lists with search and paging, the forms that
//! create and edit tenants (models, limits, budget in dollars) and the key list. The routes
//! that post to them are in [`super::ops`]; every change they make is audited there.

use maud::{html, Markup};
use serde_json::json;

use super::layout::{csrf_field, notice, time, usd};
use super::shared::{self, PAGE};
use super::Ctx;
use crate::store::keys::TenantInput;
use crate::store::Database;

pub(super) async fn tenants(
    ctx: &Ctx<'_>,
    db: &Database,
    q: &super::Form,
    error: Option<&str>,
) -> Markup {
    let search = q.trimmed("q");
    let after = q.trimmed("after");
    let list = db.list_tenants(search, after, PAGE).await;
    let config_tenants: Vec<String> = ctx
        .state
        .runtime
        .load()
        .config
        .tenants
        .keys()
        .cloned()
        .collect();
    html! {
        @if let Some(e) = error { (notice("error", e)) }
        form.filters method="get" action="/console/tenants" role="search" {
            label { "Search tenants" input type="search" name="q" value=(search.unwrap_or("")); }
            button type="submit" { "Search" }
        }
        @match &list {
            Err(e) => (notice("error", &format!("The store did not answer: {e}"))),
            Ok(list) => {
                @if list.is_empty() { p.empty { "No tenants in the store." } } @else {
                    div.scroll { table #tenants {
                        thead { tr { th scope="col" { "Tenant" } th scope="col" { "Models" } th scope="col" { "Requests / min" }
                            th scope="col" { "Budget" } th scope="col" { "State" } th scope="col" { "Created" } } }
                        tbody { @for t in list { tr {
                            td { a href={ "/console/tenants/" (t.id) } { (t.id) } }
                            td { (t.models.join(", ")) }
                            td.num { (t.limits.requests_per_minute.map_or("-".into(), |n| n.to_string())) }
                            td { (t.effective_limits().budget.map_or("none".into(), |b| format!("{} {:?}", usd(b.micro_usd as i64), b.period).to_lowercase())) }
                            td { span class={ "badge " (if t.disabled { "disabled" } else { "active" }) } { (if t.disabled { "disabled" } else { "active" }) } }
                            td { (time(t.created_at)) }
                        } } }
                    } }
                    @if list.len() as i64 == PAGE {
                        @let next = url::form_urlencoded::Serializer::new(String::new())
                            .append_pair("q", search.unwrap_or(""))
                            .append_pair("after", &list[list.len() - 1].id).finish();
                        p.more { a href={ "/console/tenants?" (next) } { "Next page" } }
                    }
                }
            }
        }
        @if !config_tenants.is_empty() {
            p.meta { "From gateway.yaml (read-only here): " (config_tenants.join(", ")) }
        }
        form.card method="post" action="/console/tenants" {
            h2 { "Create a tenant" }
            (csrf_field(&ctx.csrf))
            label { "Id" input name="id" required pattern="[A-Za-z0-9._-]{1,64}"; }
            (tenant_fields(None))
            button type="submit" { "Create tenant" }
        }
    }
}

pub(super) fn tenant_fields(t: Option<&crate::store::keys::TenantRecord>) -> Markup {
    let limits = t.map(|t| t.effective_limits()).unwrap_or_default();
    let n = |v: Option<u32>| v.map_or(String::new(), |v| v.to_string());
    let budget = limits.budget;
    html! {
        label { "Models (comma-separated, * for all)" input name="models" value=(t.map_or(String::new(), |t| t.models.join(", "))); }
        label { "Requests per minute" input name="requests_per_minute" type="number" min="1" value=(n(limits.requests_per_minute)); }
        label { "Images per minute" input name="images_per_minute" type="number" min="1" value=(n(limits.images_per_minute)); }
        label { "Requests at once" input name="concurrent_requests" type="number" min="1" value=(n(limits.concurrent_requests)); }
        label { "Budget (USD, empty: none)" input name="budget_usd" inputmode="decimal" value=(budget.map_or(String::new(), |b| format!("{}.{:06}", b.micro_usd / 1_000_000, b.micro_usd % 1_000_000))); }
        label { "Budget period" select name="budget_period" {
            @for p in ["daily", "monthly", "total"] {
                option value=(p) selected[budget.is_some_and(|b| format!("{:?}", b.period).to_lowercase() == p)] { (p) }
            }
        } }
    }
}

/// A tenant as the form gives it; numbers and money checked, with the field named.
pub(super) fn tenant_input(f: &super::Form, id: &str) -> Result<TenantInput, String> {
    let num = |name: &str| -> Result<Option<u32>, String> {
        match f.trimmed(name) {
            None => Ok(None),
            Some(v) => v
                .parse::<u32>()
                .ok()
                .filter(|n| *n > 0)
                .map(Some)
                .ok_or_else(|| format!("{name}: a whole number above 0")),
        }
    };
    let budget = match f.trimmed("budget_usd") {
        None => None,
        Some(v) => Some(serde_json::json!({
            "micro_usd": parse_usd(v).ok_or("budget_usd: an amount like 25 or 12.50")?,
            "period": match f.get("budget_period") {
                p @ ("daily" | "monthly" | "total") => p,
                _ => return Err("budget_period: daily, monthly or total".into()),
            },
        })),
    };
    let limits = crate::config::LimitsConfig {
        requests_per_minute: num("requests_per_minute")?,
        images_per_minute: num("images_per_minute")?,
        concurrent_requests: num("concurrent_requests")?,
        ..Default::default()
    };
    Ok(TenantInput {
        id: id.trim().to_string(),
        models: f
            .get("models")
            .split(',')
            .map(|m| m.trim().to_string())
            .filter(|m| !m.is_empty())
            .collect(),
        limits,
        budget,
        ..TenantInput::default()
    })
}

/// Micro-dollars of `12.5`, `12.50` or `12` (at most six decimals).
pub fn parse_usd(v: &str) -> Option<u64> {
    let v = v.trim().trim_start_matches('$');
    let (whole, frac) = v.split_once('.').unwrap_or((v, ""));
    if whole.is_empty() && frac.is_empty() || frac.len() > 6 {
        return None;
    }
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(whole) || !all_digits(frac) {
        return None;
    }
    let w: u64 = if whole.is_empty() {
        0
    } else {
        whole.parse().ok()?
    };
    let f: u64 = format!("{frac:0<6}").parse().ok()?;
    w.checked_mul(1_000_000)?.checked_add(f)
}

pub(super) fn tenant_detail(t: &TenantInput) -> serde_json::Value {
    json!({"models": t.models, "limits": t.limits, "budget": t.budget})
}

pub(super) async fn keys(ctx: &Ctx<'_>, db: &Database, q: &super::Form) -> Markup {
    let search = q.trimmed("q");
    let tenant = q.trimmed("tenant");
    let after = q.trimmed("after");
    match db.list_keys(tenant, search, after, PAGE).await {
        Err(e) => notice("error", &format!("The store did not answer: {e}")),
        Ok(list) => html! {
            form.filters method="get" action="/console/keys" role="search" {
                label { "Search keys (id or name)" input type="search" name="q" value=(search.unwrap_or("")); }
                label { "Tenant" input name="tenant" value=(tenant.unwrap_or("")); }
                button type="submit" { "Search" }
            }
            (shared::keys_table(ctx, &list, None))
            @if list.len() as i64 == PAGE {
                @let next = url::form_urlencoded::Serializer::new(String::new())
                    .append_pair("q", search.unwrap_or(""))
                    .append_pair("tenant", tenant.unwrap_or(""))
                    .append_pair("after", &list[list.len() - 1].id).finish();
                p.more { a href={ "/console/keys?" (next) } { "Next page" } }
            }
            (shared::new_key_form(ctx, None))
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usd_amounts_parse_to_micro_dollars() {
        assert_eq!(parse_usd("12"), Some(12_000_000));
        assert_eq!(parse_usd("12.5"), Some(12_500_000));
        assert_eq!(parse_usd("$0.000001"), Some(1));
        assert_eq!(parse_usd(".25"), Some(250_000));
        for bad in [
            "",
            ".",
            "1.0000001",
            "-1",
            "1e3",
            "1,5",
            "18446744073709551615",
        ] {
            assert_eq!(parse_usd(bad), None, "{bad}");
        }
    }
}
