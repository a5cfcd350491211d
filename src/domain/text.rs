//! Text hygiene for anything a user typed.

/// Escapes Slack's control characters so user text can neither ping
/// (`<!channel>`) nor forge links (`<https://evil|click>`).
pub fn escape_slack(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            _ => out.push(c),
        }
    }
    out
}

/// Control characters and bidirectional overrides can hide what a request
/// really says from the approver reading it, so they are refused outright.
pub fn has_hidden_characters(text: &str) -> bool {
    text.chars().any(|c| {
        (c.is_control() && c != ' ')
            || matches!(c, '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{FEFF}')
    })
}

/// Shortens text for echoing back in an error message.
pub fn clip(text: &str, max_chars: usize) -> String {
    if text.chars().count() <= max_chars {
        text.to_string()
    } else {
        let mut s: String = text.chars().take(max_chars).collect();
        s.push('…');
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_mentions_and_links() {
        assert_eq!(
            escape_slack("<!channel> & <https://evil|click>"),
            "&lt;!channel&gt; &amp; &lt;https://evil|click&gt;"
        );
    }

    #[test]
    fn finds_control_and_bidi() {
        assert!(has_hidden_characters("a\u{0007}b"));
        assert!(has_hidden_characters("prod\u{202E}dorp"));
        assert!(has_hidden_characters("x\ny"));
        assert!(!has_hidden_characters(
            "prod-cluster 2h edit --ns a,b fixing INC-1"
        ));
        assert!(!has_hidden_characters("déploiement ünïcode 日本"));
    }

    #[test]
    fn clips_long_text() {
        assert_eq!(clip("abc", 5), "abc");
        assert_eq!(clip("abcdef", 3), "abc…");
    }
}
