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
    text.chars().any(is_hidden)
}

/// Whether `c` is one of the characters `has_hidden_characters` looks for.
fn is_hidden(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{00AD}'
                | '\u{200B}'..='\u{200F}'
                | '\u{2028}'..='\u{202E}'
                | '\u{2060}'..='\u{2064}'
                | '\u{2066}'..='\u{2069}'
                | '\u{FEFF}'
                | '\u{E0000}'..='\u{E007F}'
        )
}

/// Text read from a cluster (an aws-auth username, a group, an error),
/// made safe for an operator's terminal: control characters (an ANSI escape
/// sequence could rewrite the screen or hide a line) and invisible or
/// direction-changing characters are shown as `\u{…}` instead of acting.
pub fn terminal_safe(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if is_hidden(c) {
            out.push_str(&format!("\\u{{{:x}}}", c as u32));
        } else if c == '\\' {
            // So a literal `\u{1b}` in a name never reads as an escape.
            out.push_str("\\\\");
        } else {
            out.push(c);
        }
    }
    out
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

/// Where an error's text turns into a debug dump of its value: the AWS
/// SDK's context display ends with `(DispatchFailure(…))` and friends, and
/// transport errors from HTTP clients print `Some(hyper_util::…)`.
const DUMP_STARTS: [&str; 6] = [
    " (DispatchFailure(",
    " (ServiceError(",
    " (TimeoutError(",
    " (ResponseError(",
    " (ConstructionFailure(",
    " Some(",
];

/// One finding's error for a line of `tollgate check`: the chain of causes
/// without the debug dump that follows it, the OS's words for an I/O
/// failure kept (they are often the only cause that says anything), on one
/// line of at most `max_chars`. `check --verbose` prints the whole error.
pub fn brief_error(text: &str, max_chars: usize) -> String {
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let cut = DUMP_STARTS
        .iter()
        .filter_map(|m| text.find(m))
        .min()
        .unwrap_or(text.len());
    let (kept, dump) = text.split_at(cut);
    let mut out = kept.trim_end_matches([':', ' ']).to_string();
    // An I/O error's Debug says `message: "…"`; an AWS service error's
    // says `message: Some("…")`.
    if let Some(said) = ["message: \"", "message: Some(\""]
        .iter()
        .find_map(|m| dump.split(m).nth(1))
        .and_then(|rest| rest.split('"').next())
        .filter(|m| !m.is_empty() && !out.contains(*m))
    {
        out.push_str(&format!(" ({said})"));
    }
    clip(&out, max_chars)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn brief_error_keeps_the_causes_and_drops_the_dumps() {
        let aws = "cluster prod: DescribeCluster on prod failed: dispatch failure: io error: \
                   client error (Connect): tcp connect error: Connection refused (os error 111) \
                   (DispatchFailure(DispatchFailure { source: ConnectorError { kind: Io, source: \
                   hyper_util::client::legacy::Error(Connect, ConnectError(\"tcp connect error\")) } }))";
        assert_eq!(
            brief_error(aws, 300),
            "cluster prod: DescribeCluster on prod failed: dispatch failure: io error: client \
             error (Connect): tcp connect error: Connection refused (os error 111)"
        );
        let slack = "slack auth.test: Slack auth.test failed: Slack http protocol error: \
                     Some(hyper_util::client::legacy::Error(Connect, ConnectError(\"tcp connect \
                     error\", 127.0.0.1:9, Os { code: 111, kind: ConnectionRefused, message: \
                     \"Connection refused\" })))";
        assert_eq!(
            brief_error(slack, 300),
            "slack auth.test: Slack auth.test failed: Slack http protocol error (Connection refused)"
        );
        // Nothing to drop: only made one line and clipped.
        assert_eq!(
            brief_error("store:\n  table missing", 300),
            "store: table missing"
        );
        assert_eq!(
            brief_error(&"x".repeat(400), 10),
            format!("{}…", "x".repeat(10))
        );
    }

    #[test]
    fn terminal_safe_shows_escapes_instead_of_running_them() {
        let hostile = "tollgate:\u{1b}[2K\u{1b}[1Aadmin\r\u{202e}x\u{7f}";
        let safe = terminal_safe(hostile);
        assert!(!safe.chars().any(is_hidden), "{safe}");
        assert_eq!(
            safe,
            "tollgate:\\u{1b}[2K\\u{1b}[1Aadmin\\u{d}\\u{202e}x\\u{7f}"
        );
        assert_eq!(
            terminal_safe("arn:aws:iam::1:role/ops é"),
            "arn:aws:iam::1:role/ops é"
        );
        assert_eq!(
            terminal_safe(r"a\u{1b}b"),
            r"a\\u{1b}b",
            "a backslash is escaped"
        );
        for hidden in ['\u{2028}', '\u{00AD}', '\u{2061}', '\u{E0041}'] {
            assert!(!terminal_safe(&format!("x{hidden}y")).contains(hidden));
        }
    }

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
