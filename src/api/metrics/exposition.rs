//! Prometheus text, written family by family into one buffer.
//!
//! The scrape has every value at hand in its snapshots, so it needs no
//! registry of handles: it writes each family's `# HELP` and `# TYPE` lines
//! and then its samples, with `metrics-exporter-prometheus`'s own formatting
//! (line layout, escaping of descriptions); label values are escaped here (see
//! [`escape_into`] for why). A peer's labels are escaped once into a
//! [`Labels`] and written as they are for each of its series. At 100,000 peers that is about a tenth of the time the exporter's
//! recorder took to register and render the same series (see the README's
//! scale table).
//!
//! Left out: what the series are ([`super::series`]); checking that the
//! caller writes each family whole before the next (the text format wants a
//! family's samples together; a debug build checks that no family starts
//! twice, and the tests check the scrape's output).

use std::fmt::Display;

use metrics_exporter_prometheus::formatting::{
    write_help_line, write_metric_line, write_type_line,
};

/// A family's type.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    Counter,
    Gauge,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        }
    }
}

/// The exposition being written.
pub struct Text {
    text: String,
    /// The families started (a debug build checks that none starts twice).
    #[cfg(debug_assertions)]
    started: Vec<&'static str>,
}

impl Text {
    /// An empty exposition with room for `bytes`.
    pub fn with_capacity(bytes: usize) -> Self {
        Self {
            text: String::with_capacity(bytes),
            #[cfg(debug_assertions)]
            started: Vec::new(),
        }
    }

    /// Starts a family. Its header is written with its first sample: a family
    /// without samples leaves no trace.
    pub fn family(&mut self, name: &'static str, kind: Kind, help: &'static str) -> Family<'_> {
        #[cfg(debug_assertions)]
        {
            assert!(!self.started.contains(&name), "{name} started twice");
            self.started.push(name);
        }
        Family {
            text: &mut self.text,
            name,
            kind,
            help,
            started: false,
        }
    }

    /// The text.
    pub fn into_string(self) -> String {
        self.text
    }
}

/// A family being written; see [`Text::family`].
pub struct Family<'a> {
    text: &'a mut String,
    name: &'static str,
    kind: Kind,
    help: &'static str,
    started: bool,
}

impl Family<'_> {
    /// One sample.
    pub fn sample(&mut self, labels: &Labels, value: impl Display) {
        if !self.started {
            self.started = true;
            write_help_line(self.text, self.name, self.help);
            write_type_line(self.text, self.name, self.kind.as_str());
        }
        let labels: &[String] = if labels.0.is_empty() {
            &[]
        } else {
            std::slice::from_ref(&labels.0)
        };
        write_metric_line::<&str, _>(self.text, self.name, None, labels, None, value, None);
    }
}

impl Drop for Family<'_> {
    fn drop(&mut self) {
        if self.started {
            self.text.push('\n');
        }
    }
}

/// A series' labels, escaped: `key="value",…`.
#[derive(Debug, Clone, Default)]
pub struct Labels(String);

impl Labels {
    /// No labels.
    pub fn none() -> Self {
        Self::default()
    }

    /// These labels and `key="value"`. `key` is one of the appliance's own
    /// label names (they are valid as they are); `value` is escaped.
    pub fn with(mut self, key: &'static str, value: &str) -> Self {
        debug_assert!(key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'));
        if !self.0.is_empty() {
            self.0.push(',');
        }
        self.0.push_str(key);
        self.0.push_str("=\"");
        escape_into(&mut self.0, value);
        self.0.push('"');
        self
    }

    /// A copy of these labels with `key="value"`.
    pub fn and(&self, key: &'static str, value: &str) -> Self {
        self.clone().with(key, value)
    }
}

/// Appends `value` escaped as the text format wants a label value: `\\`,
/// `\"` and `\n` for a backslash, a double quote and a line feed.
///
/// Not the exporter's `sanitize_label_value`: that one takes a backslash
/// before a backslash or a quote as an escape already made, so a name with
/// `\\` in it would read as one backslash in Prometheus, and one with `\"`
/// as a bare quote.
fn escape_into(text: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => text.push_str("\\\\"),
            '"' => text.push_str("\\\""),
            '\n' => text.push_str("\\n"),
            c => text.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads an escaped label value back, as Prometheus does.
    fn unescape(escaped: &str) -> String {
        let mut out = String::new();
        let mut chars = escaped.chars();
        while let Some(c) = chars.next() {
            assert!(c != '"' && c != '\n', "{c:?} unescaped in {escaped}");
            if c != '\\' {
                out.push(c);
                continue;
            }
            match chars.next() {
                Some('n') => out.push('\n'),
                Some(e @ ('\\' | '"')) => out.push(e),
                other => panic!("not an escape: \\{other:?} in {escaped}"),
            }
        }
        out
    }

    #[test]
    fn label_values_read_back_as_they_were() {
        for value in [
            "plain",
            "a\\\\b",
            "a\\\"b",
            "\\",
            "\"",
            "x\ny",
            "é ü \\n",
            "",
        ] {
            let labels = Labels::none().with("friendly_name", value);
            let inner = labels
                .0
                .strip_prefix("friendly_name=\"")
                .and_then(|s| s.strip_suffix('"'))
                .unwrap();
            assert!(!inner.contains('\n'));
            assert_eq!(unescape(inner), value, "{}", labels.0);
        }
    }

    #[test]
    fn a_family_is_its_header_then_its_samples() {
        let mut text = Text::with_capacity(0);
        {
            let mut f = text.family("wgplane_x_total", Kind::Counter, "Things.\nMore.");
            let base = Labels::none().with("tenant", "a\"b\\c\nd");
            f.sample(&base, 3u64);
            f.sample(&base.and("reason", "z"), 4u64);
        }
        text.family("wgplane_empty", Kind::Gauge, "Never written.");
        text.family("wgplane_up", Kind::Gauge, "Up.")
            .sample(&Labels::none(), 1.0);
        assert_eq!(
            text.into_string(),
            "# HELP wgplane_x_total Things.\\nMore.\n\
             # TYPE wgplane_x_total counter\n\
             wgplane_x_total{tenant=\"a\\\"b\\\\c\\nd\"} 3\n\
             wgplane_x_total{tenant=\"a\\\"b\\\\c\\nd\",reason=\"z\"} 4\n\
             \n\
             # HELP wgplane_up Up.\n\
             # TYPE wgplane_up gauge\n\
             wgplane_up 1\n\
             \n"
        );
    }
}
