//! Wall-clock times as the API and the events write them. Only formatting: the
//! clock is read by the callers.

use std::time::SystemTime;

/// RFC 3339 UTC, seconds precision. A time RFC 3339 cannot write (before 1970 or
/// after the year 9999: a clock set wildly wrong; the store refuses those) shows
/// as the nearest instant it can, never as a panic.
pub fn rfc3339(t: SystemTime) -> String {
    use std::fmt::Write;
    if t < SystemTime::UNIX_EPOCH {
        return "1970-01-01T00:00:00Z".to_owned();
    }
    let mut text = String::new();
    match write!(text, "{}", humantime::format_rfc3339_seconds(t)) {
        Ok(()) => text,
        Err(_) => "9999-12-31T23:59:59Z".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn any_clock_is_written_without_a_panic() {
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let before = SystemTime::UNIX_EPOCH - Duration::from_secs(1);
        assert_eq!(rfc3339(before), "1970-01-01T00:00:00Z");
        let far = SystemTime::UNIX_EPOCH + Duration::from_secs(400_000_000_000);
        assert_eq!(rfc3339(far), "9999-12-31T23:59:59Z");
    }
}
