//! Durations as people type them (`90m`, `2h`, `1h30m`), checked against a
//! policy's range.

use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DurationRange {
    pub min: Duration,
    pub max: Duration,
}

impl DurationRange {
    pub fn describe(&self) -> String {
        format!(
            "between {} and {}",
            format_duration(self.min),
            format_duration(self.max)
        )
    }
}

/// Parses and range-checks in one step so every refusal can state the
/// allowed range.
pub fn parse_in_range(text: &str, range: &DurationRange) -> Result<Duration, String> {
    let shown = super::text::escape_slack(&super::text::clip(text, 40));
    let parsed = humantime::parse_duration(text).map_err(|_| {
        format!(
            "`{shown}` is not a duration. Use a value like `30m`, `2h` or `1h30m`, {}.",
            range.describe()
        )
    })?;
    if parsed.is_zero() {
        return Err(format!(
            "A duration of zero grants nothing. Ask for {}.",
            range.describe()
        ));
    }
    if parsed < range.min || parsed > range.max {
        return Err(format!(
            "`{shown}` is out of range: ask for {}.",
            range.describe()
        ));
    }
    Ok(parsed)
}

/// Compact form for messages: `2h`, `1h 30m`, `45s`.
pub fn format_duration(d: Duration) -> String {
    humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range() -> DurationRange {
        DurationRange {
            min: Duration::from_secs(5 * 60),
            max: Duration::from_secs(4 * 3600),
        }
    }

    #[test]
    fn accepts_human_forms_in_range() {
        assert_eq!(
            parse_in_range("90m", &range()),
            Ok(Duration::from_secs(5400))
        );
        assert_eq!(
            parse_in_range("2h", &range()),
            Ok(Duration::from_secs(7200))
        );
        assert_eq!(
            parse_in_range("1h30m", &range()),
            Ok(Duration::from_secs(5400))
        );
        assert_eq!(parse_in_range("5m", &range()), Ok(Duration::from_secs(300)));
        assert_eq!(
            parse_in_range("4h", &range()),
            Ok(Duration::from_secs(14400))
        );
    }

    #[test]
    fn refuses_with_the_range() {
        for bad in [
            "0s", "0m", "-1h", "4m", "4h1s", "99999h", "h", "2x", "", "1e9h",
        ] {
            let err = parse_in_range(bad, &range()).unwrap_err();
            assert!(err.contains("between 5m and 4h"), "{bad}: {err}");
        }
    }

    #[test]
    fn refuses_overflow_without_panicking() {
        let err = parse_in_range("99999999999999999999999h", &range()).unwrap_err();
        assert!(err.contains("between"), "{err}");
        let err = parse_in_range("18446744073709551615s", &range()).unwrap_err();
        assert!(err.contains("out of range"), "{err}");
    }

    #[test]
    fn formats_compactly() {
        assert_eq!(format_duration(Duration::from_secs(5400)), "1h 30m");
        assert_eq!(format_duration(Duration::from_millis(2500)), "2s");
    }
}
