//! Durations on the command line (`250ms`, `10s`, `5m`, `1h`) and in messages.
//!
//! `leasehold-server` includes this file too, so both commands read durations alike.

use std::time::Duration;

/// Parses `250ms`, `10s`, `5m`, `1h`. A number needs its unit (`5` could mean anything),
/// except `0`.
pub fn parse(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 250ms, 10s, 5m or 1h"))?;
    let ms = match unit {
        "ms" => n,
        "s" => n.saturating_mul(1000),
        "m" => n.saturating_mul(60_000),
        "h" => n.saturating_mul(3_600_000),
        "" if n == 0 => 0,
        "" => {
            return Err(format!(
                "{s:?} has no unit: write {n}s for seconds (or {n}ms, {n}m, {n}h)"
            ));
        }
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use ms, s, m or h)")),
    };
    Ok(Duration::from_millis(ms))
}

/// A short human form: `0s`, `250ms`, `1.5s`, `42s`, `5m07s`, `2h03m`.
pub fn human(d: Duration) -> String {
    let ms = d.as_millis();
    let s = d.as_secs();
    if ms == 0 {
        "0s".to_owned()
    } else if ms < 1000 {
        format!("{ms}ms")
    } else if s < 10 && ms % 1000 != 0 {
        format!("{:.1}s", d.as_secs_f64())
    } else if s < 60 {
        format!("{s}s")
    } else if s < 3600 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{}h{:02}m", s / 3600, s % 3600 / 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(
            parse("10"),
            Err("\"10\" has no unit: write 10s for seconds (or 10ms, 10m, 10h)".into())
        );
        assert_eq!(parse("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse("0"), Ok(Duration::ZERO));
        assert!(parse("5x").is_err());
        assert!(parse("-1s").is_err());
        assert!(parse("").is_err());
    }

    #[test]
    fn formats_for_humans() {
        assert_eq!(human(Duration::ZERO), "0s");
        assert_eq!(human(Duration::from_millis(250)), "250ms");
        assert_eq!(human(Duration::from_millis(1500)), "1.5s");
        assert_eq!(human(Duration::from_secs(42)), "42s");
        assert_eq!(human(Duration::from_secs(307)), "5m07s");
        assert_eq!(human(Duration::from_secs(7380)), "2h03m");
    }
}
