//! The console's page frame and the pieces pages share: navigation, tables, money, times,
//! budget bars and server-drawn SVG charts. Every value goes through maud, which escapes it.

use maud::{html, Markup, PreEscaped, DOCTYPE};

use super::session::Session;

/// A page's frame: where it lives, who is looking and the CSRF token of its forms.
pub struct Frame<'a> {
    /// `/console` or `/portal`.
    pub base: &'a str,
    pub title: &'a str,
    /// The navigation entry shown as current.
    pub active: &'a str,
    pub session: Option<&'a Session>,
    pub csrf: &'a str,
    /// (path under base, label)
    pub nav: &'a [(&'a str, &'a str)],
}

pub fn page(f: &Frame<'_>, content: Markup) -> Markup {
    let product = if f.base == "/portal" {
        "imagegate portal"
    } else {
        "imagegate console"
    };
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (f.title) " · " (product) }
                link rel="stylesheet" href={ (f.base) "/assets/app.css" };
                script src={ (f.base) "/assets/app.js" } defer {}
            }
            body {
                a.skip href="#main" { "Skip to content" }
                header.top {
                    span.brand { (product) }
                    @if let Some(s) = f.session {
                        nav aria-label="Sections" {
                            ul {
                                @for (path, label) in f.nav {
                                    li {
                                        @if *path == f.active {
                                            a href={ (f.base) "/" (path) } aria-current="page" { (label) }
                                        } @else {
                                            a href={ (f.base) "/" (path) } { (label) }
                                        }
                                    }
                                }
                            }
                        }
                        form.logout method="post" action={ (f.base) "/logout" } {
                            input type="hidden" name="csrf" value=(f.csrf);
                            span.who { (s.who.actor()) }
                            button type="submit" { "Log out" }
                        }
                    }
                }
                main #main {
                    h1 { (f.title) }
                    (content)
                }
            }
        }
    }
}

pub fn csrf_field(token: &str) -> Markup {
    html! { input type="hidden" name="csrf" value=(token); }
}

/// A notice above a page's content: `kind` is `ok` or `error`.
pub fn notice(kind: &str, text: &str) -> Markup {
    html! { p class={ "notice " (kind) } role=(if kind == "error" { "alert" } else { "status" }) { (text) } }
}

/// `$1.234567` from micro-dollars.
pub fn usd(micro: i64) -> String {
    let sign = if micro < 0 { "-" } else { "" };
    let m = micro.unsigned_abs();
    format!("{sign}${}.{:06}", m / 1_000_000, m % 1_000_000)
}

/// `2026-12-07 13:45:10Z` from unix seconds.
pub fn time(unix: i64) -> String {
    if unix <= 0 {
        return "-".into();
    }
    let (y, m, d) = crate::clock::civil_from_days(unix.div_euclid(86_400));
    let s = unix.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}Z",
        s / 3600,
        s % 3600 / 60,
        s % 60
    )
}

/// A budget's use as a bar with its figures beside it.
pub fn budget_bar(label: &str, spent: u64, held: u64, limit: u64, period: &str) -> Markup {
    let left = limit.saturating_sub(spent + held);
    html! {
        div.budget {
            label { (label) " (" (period) ")"
                meter min="0" max=(limit) value=((spent + held).min(limit)) low=(limit / 2) high=(limit * 9 / 10) optimum="0" {
                    (usd((spent + held) as i64)) " of " (usd(limit as i64))
                }
            }
            span.figures { (usd(left as i64)) " left · " (usd(spent as i64)) " spent · " (usd(held as i64)) " held" }
        }
    }
}

/// A bar chart of `values`, drawn on the server: no script, no library. `labels` name the
/// first and last bars.
pub fn bars(title: &str, values: &[u64], first: &str, last: &str, unit: &str) -> Markup {
    let (w, h) = (600u64, 120u64);
    let max = values.iter().copied().max().unwrap_or(0).max(1);
    let n = values.len().max(1) as u64;
    let bw = w / n;
    let total: u64 = values.iter().sum();
    let mut rects = String::new();
    for (i, v) in values.iter().enumerate() {
        let bh = v * (h - 2) / max;
        let x = i as u64 * bw;
        let title = format!("{v} {unit}");
        rects.push_str(&format!(
            "<rect x=\"{x}\" y=\"{}\" width=\"{}\" height=\"{bh}\"><title>{}</title></rect>",
            h - bh,
            bw.saturating_sub(1).max(1),
            escape(&title)
        ));
    }
    html! {
        figure.chart {
            figcaption { (title) ": " (total) " " (unit) " · peak " (values.iter().max().copied().unwrap_or(0)) }
            svg viewBox={ "0 0 " (w) " " (h) } role="img" aria-label={ (title) ", " (total) " " (unit) " in all" } preserveAspectRatio="none" {
                (PreEscaped(rects))
            }
            div.axis { span { (first) } span { (last) } }
        }
    }
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}
