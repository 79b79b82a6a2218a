//! Durations written as string literals: `"500ms"`, `"30s"`, `"2m"`, `"1h"`.

/// Parses an integer followed by `ms`, `s`, `m` or `h` into milliseconds.
pub(crate) fn parse_millis(text: &str) -> Result<u64, String> {
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(digits_end);
    let factor: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => {
            return Err(format!(
                "invalid duration `{text}`: expected an integer followed by `ms`, `s`, `m` or `h`, \
             such as \"500ms\", \"30s\", \"2m\" or \"1h\""
            ));
        }
    };
    if digits.is_empty() {
        return Err(format!(
            "invalid duration `{text}`: expected an integer before `{unit}`, such as \"30{unit}\""
        ));
    }
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(factor))
        .ok_or_else(|| format!("duration `{text}` is too large"))
}

#[cfg(test)]
mod tests {
    use super::parse_millis;

    #[test]
    fn accepts_every_unit() {
        assert_eq!(parse_millis("500ms"), Ok(500));
        assert_eq!(parse_millis("30s"), Ok(30_000));
        assert_eq!(parse_millis("2m"), Ok(120_000));
        assert_eq!(parse_millis("1h"), Ok(3_600_000));
        assert_eq!(parse_millis("0s"), Ok(0));
    }

    #[test]
    fn rejects_malformed_durations() {
        for bad in [
            "", "30", "s", "ms", "30 s", "1.5s", "-1s", "30sec", "30S", "1d",
        ] {
            let error = parse_millis(bad).unwrap_err();
            assert!(error.starts_with("invalid duration"), "{bad}: {error}");
        }
        assert_eq!(
            parse_millis("99999999999999999999h").unwrap_err(),
            "duration `99999999999999999999h` is too large"
        );
        assert!(parse_millis("18446744073709551615h").is_err());
    }
}
