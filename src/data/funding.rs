//! Funding-round headlines written from the structured records of `indian-startup-funding`
//! (CC0; trak.in's list of 3,044 Indian startup rounds, 2015-2020): weak supervision for the
//! deal kind modern news reports most and the labelled sources cover least.
//!
//! Each usable record yields one INVEST headline and one non-deal headline about the same
//! company (a launch, a hire, a price rise, revenue, a partnership without terms, ...), so a
//! startup's name, city or a dollar amount never decides the label alone. The template is
//! picked by a hash of the record id: the set is the same on every machine and run.
//! Training only: these texts are synthetic, so they never enter validation or a test set.

use std::path::Path;

use serde::Deserialize;

use super::{DataError, Example};

/// Where the records live under the shared data directory.
pub const FILE: &str = "indian-startup-funding/startup_funding.jsonl";

#[derive(Deserialize)]
struct Record {
    id: String,
    #[serde(rename = "StartupName")]
    name: String,
    #[serde(rename = "IndustryVertical")]
    vertical: String,
    #[serde(rename = "SubVertical")]
    sub_vertical: String,
    #[serde(rename = "CityLocation")]
    city: String,
    #[serde(rename = "InvestorsName")]
    investors: String,
    #[serde(rename = "InvestmentType")]
    kind: String,
    amount_usd: Option<f64>,
}

/// A record's fields, cleaned; `None` where the record is too broken to write about.
struct Facts {
    name: String,
    what: String,
    city: String,
    lead: String,
    investors: String,
    round: Round,
    amount: Option<String>,
}

#[derive(Clone, Copy)]
enum Round {
    Seed,
    Series(char),
    PreSeriesA,
    Debt,
    Unnamed,
}

impl Round {
    fn parse(kind: &str) -> Self {
        let k = kind.to_lowercase().replace("\\n", " ");
        if k.contains("pre-series") {
            Round::PreSeriesA
        } else if let Some(rest) = k.trim().strip_prefix("series ") {
            rest.chars().next().map_or(Round::Unnamed, |c| Round::Series(c.to_ascii_uppercase()))
        } else if k.contains("seed") || k.contains("angel") {
            Round::Seed
        } else if k.contains("debt") {
            Round::Debt
        } else {
            Round::Unnamed
        }
    }

    /// "a Series B round", "seed funding", ...: what follows "raises $X in".
    fn phrase(self) -> String {
        match self {
            Round::Debt => "debt financing".into(),
            Round::Unnamed => "a funding round".into(),
            named => format!("a {} round", named.short()),
        }
    }

    /// "Series B", "seed", ...: an adjective before "funding".
    fn short(self) -> String {
        match self {
            Round::Seed => "seed".into(),
            Round::Series(c) => format!("Series {c}"),
            Round::PreSeriesA => "pre-Series A".into(),
            Round::Debt => "debt".into(),
            Round::Unnamed => "new".into(),
        }
    }
}

fn clean(field: &str) -> Option<String> {
    let text = field.replace("\\n", " ").split_whitespace().collect::<Vec<_>>().join(" ");
    let broken = text.is_empty() || text == "nan" || text.contains('\\') || text.contains("http") || text.contains("www.");
    (!broken).then_some(text)
}

/// "$12 million", "$1.5 billion", "$800,000": as a headline would write the amount.
fn money(usd: f64) -> Option<String> {
    let trim = |x: f64| format!("{x:.1}").trim_end_matches(".0").to_string();
    match usd {
        x if !(10_000.0..=20e9).contains(&x) => None,
        x if x >= 1e9 => Some(format!("${} billion", trim(x / 1e9))),
        x if x >= 1e6 => Some(format!("${} million", trim(x / 1e6))),
        x => Some(format!("${},000", (x / 1000.0).round() as u64)),
    }
}

impl Facts {
    fn of(r: &Record) -> Option<Self> {
        let name = clean(&r.name).filter(|n| n.len() <= 40)?;
        let investors: Vec<String> = r
            .investors
            .split([',', '&'])
            .filter_map(clean)
            .filter(|i| !i.to_lowercase().contains("undisclosed") && (3..=60).contains(&i.len()))
            .collect();
        let lead = investors.first()?.clone();
        let investors = match investors.as_slice() {
            [one] => one.clone(),
            [a, b, ..] => format!("{a} and {b}"),
            [] => return None,
        };
        let what = clean(&r.sub_vertical).or_else(|| clean(&r.vertical)).filter(|w| w.len() <= 50)?.to_lowercase();
        let city = clean(&r.city).and_then(|c| c.split('/').next().map(|c| c.trim().to_string())).unwrap_or_else(|| "Bengaluru".into());
        Some(Facts { name, what, city, lead, investors, round: Round::parse(&r.kind), amount: r.amount_usd.and_then(money) })
    }

    fn deal_headline(&self, pick: u64) -> String {
        let (n, w, c, lead, all, round) = (&self.name, &self.what, &self.city, &self.lead, &self.investors, self.round);
        match &self.amount {
            Some(amt) => match pick % 10 {
                0 => format!("{n} raises {amt} in {} led by {lead}", round.phrase()),
                1 => format!("{n} raises {amt} {} funding from {all}", round.short()),
                2 => format!("{c}-based {w} startup {n} secures {amt}"),
                3 => format!("{lead} invests {amt} in {n}"),
                4 => format!("{lead} leads {amt} {} round in {n}", round.short()),
                5 => format!("{n} bags {amt} from {all}"),
                6 => format!("{n} closes {amt} {} round to expand its {w} business", round.short()),
                7 => format!("{n} in talks to raise {amt} from {lead}: sources"),
                8 => format!("{w} platform {n} picks up {amt} in {}", round.phrase()),
                _ => format!("{n} lands {amt} as {lead} backs the {c} startup"),
            },
            None => match pick % 4 {
                0 => format!("{n} raises {} funding from {all}", round.short()),
                1 => format!("{lead} backs {w} startup {n}"),
                2 => format!("{n} raises undisclosed amount in {} led by {lead}", round.phrase()),
                _ => format!("{c}-based {n} gets funding from {all}"),
            },
        }
    }

    fn other_headline(&self, pick: u64, other: &Facts) -> String {
        let (n, w, c, o) = (&self.name, &self.what, &self.city, &other.name);
        match pick % 12 {
            0 => format!("{n} launches {w} service in {c}"),
            1 => format!("{n} appoints former {o} executive as chief operating officer"),
            2 => format!("{n} lays off {} employees in restructuring", 20 + pick % 200),
            3 => format!("{n} expands {w} offering to {}", other.city),
            4 => match &self.amount {
                Some(amt) => format!("{n} reports {amt} in annual revenue"),
                None => format!("{n} says revenue doubled last year"),
            },
            5 => format!("{n} partners with {o} to offer {w}"),
            6 => format!("{n} raises prices for its {w} customers"),
            7 => format!("{n} co-founder on building a {w} business in {c}"),
            8 => format!("{n} app crosses {} million downloads", 1 + pick % 20),
            9 => format!("Why investors are betting on {w} startups"),
            10 => format!("{n} faces customer complaints over {w} outages"),
            _ => format!("{n} shuts down its {c} operations"),
        }
    }
}

/// Two examples per usable record: its INVEST headline and a non-deal one.
pub fn load(data_dir: &Path) -> Result<Vec<Example>, DataError> {
    let records: Vec<Record> = super::read_jsonl(&data_dir.join(FILE))?;
    let facts: Vec<(&str, Facts)> = records.iter().filter_map(|r| Some((r.id.as_str(), Facts::of(r)?))).collect();
    let mut out = Vec::with_capacity(2 * facts.len());
    for (i, (id, f)) in facts.iter().enumerate() {
        let pick = crate::fnv::hash(id);
        // Another company for the non-deal templates that name two.
        let other = &facts[(i + 1 + (pick as usize % 97)) % facts.len()].1;
        let example = |suffix: &str, text: String, deal: bool| Example {
            id: format!("{id}-{suffix}"),
            title: None,
            text,
            deal,
            subtype: Some(if deal { "INVEST" } else { "OTHER" }.into()),
        };
        out.push(example("deal", f.deal_headline(pick >> 8), true));
        out.push(example("other", f.other_headline(pick >> 16, other), false));
    }
    Ok(out)
}
