//! Reuters-21578 (SGML, latin-1) with the ModApte split; deal = the `acq` topic.

use std::path::Path;

use super::{DataError, Example, Split};

/// ModApte documents of `split` (Train or Test): `LEWISSPLIT` matches and `TOPICS="YES"`.
pub fn load(dir: &Path, split: Split) -> Result<Vec<Example>, DataError> {
    let wanted = match split {
        Split::Test => "TEST",
        _ => "TRAIN",
    };
    let mut out = Vec::new();
    for n in 0..22 {
        let path = dir.join(format!("reut2-{n:03}.sgm"));
        let bytes = std::fs::read(&path).map_err(|e| DataError::io(&path, e))?;
        // Latin-1: every byte is the code point of the same value.
        let text: String = bytes.iter().map(|&b| b as char).collect();
        for doc in text.split("<REUTERS ").skip(1) {
            let head = doc.split('>').next().unwrap_or_default();
            if attr(head, "LEWISSPLIT") != Some(wanted) || attr(head, "TOPICS") != Some("YES") {
                continue;
            }
            let newid = attr(head, "NEWID").ok_or_else(|| DataError::parse(&path, "REUTERS element without NEWID"))?;
            let topics = element(doc, "TOPICS").unwrap_or_default();
            let deal = topics.split("<D>").skip(1).any(|t| t.split("</D>").next() == Some("acq"));
            let title = element(doc, "TITLE").map(clean).filter(|t| !t.is_empty());
            let body = match element(doc, "BODY") {
                Some(body) => clean(body),
                // UNPROC documents carry their text directly in <TEXT>.
                None if title.is_none() => clean(&strip_tags(element(doc, "TEXT").unwrap_or_default())),
                None => String::new(),
            };
            let (title, text) = match (title, body.is_empty()) {
                (Some(t), true) => (None, t),
                (title, _) => (title, body),
            };
            out.push(Example { id: format!("reuters-{newid}"), title, text, deal, subtype: None });
        }
    }
    Ok(out)
}

fn attr<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    let start = head.find(&format!("{name}=\""))? + name.len() + 2;
    head[start..].split('"').next()
}

fn element<'a>(doc: &'a str, tag: &str) -> Option<&'a str> {
    let open = doc.find(&format!("<{tag}"))?;
    let content = open + doc[open..].find('>')? + 1;
    let end = content + doc[content..].find(&format!("</{tag}>"))?;
    Some(&doc[content..end])
}

fn strip_tags(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut in_tag = false;
    for c in s.chars() {
        match c {
            '<' => in_tag = true,
            '>' if in_tag => in_tag = false,
            c if !in_tag => out.push(c),
            _ => {}
        }
    }
    out
}

/// Decodes entities, drops the `Reuter` sign-off and control characters, and joins the
/// hard-wrapped lines.
fn clean(s: &str) -> String {
    let decoded = s
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
        .replace("&#3;", "")
        .replace("&#22;", "")
        .replace("&#5;", "")
        .replace("&#30;", "")
        .replace("&#31;", "")
        .replace("&#127;", "");
    let decoded: String = decoded.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    let mut text = decoded.split_whitespace().collect::<Vec<_>>().join(" ");
    // Some stories are signed off twice.
    while let Some(stripped) = text.strip_suffix(" Reuter").or_else(|| text.strip_suffix(" REUTER")) {
        text = stripped.to_string();
    }
    text
}
