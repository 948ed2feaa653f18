//! Bounding what untrusted input may put into state: header values, metric labels, log fields
//! and error messages are cut to a known length, and metric labels only take values from sets
//! the operator configured.

use std::borrow::Cow;

/// Longest metric label value taken from configuration (subscription names, topic ARNs).
pub const LABEL_MAX: usize = 128;
/// Longest value echoed from a request into an error message or a log field.
pub const ECHO_MAX: usize = 256;

/// Cuts `s` to at most `max` bytes (at a character boundary), saying how long it was.
pub fn bounded(s: &str, max: usize) -> Cow<'_, str> {
    if s.len() <= max {
        return s.into();
    }
    let marker = format!("…[truncated, {} bytes]", s.len());
    let mut end = max.saturating_sub(marker.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{marker}", &s[..end]).into()
}

/// A request value echoed into a message or a log line: at most [`ECHO_MAX`] bytes.
pub fn echo(s: &str) -> Cow<'_, str> {
    bounded(s, ECHO_MAX)
}

/// A metric label from request data: the value when the operator listed it in `known`, else
/// `other`; never longer than [`LABEL_MAX`]. So labels (and the memory and `/metrics` they take)
/// stay bounded whatever requests carry.
pub fn label(value: Option<&str>, known: &[String]) -> String {
    match value {
        Some(v) if known.iter().any(|k| k == v) => bounded(v, LABEL_MAX).into_owned(),
        Some(_) => "other".into(),
        None => "none".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_cuts_at_a_character_boundary_and_says_so() {
        let s = "é".repeat(1000);
        let b = bounded(&s, 100);
        assert!(b.len() <= 100);
        assert!(b.ends_with("[truncated, 2000 bytes]"), "{b}");
        assert_eq!(bounded("short", 100), "short");
    }

    #[test]
    fn labels_come_from_the_configured_set_only() {
        let known = vec!["orders".to_string()];
        assert_eq!(label(Some("orders"), &known), "orders");
        assert_eq!(label(Some(&"x".repeat(100_000)), &known), "other");
        assert_eq!(label(None, &known), "none");
    }
}
