//! Record timestamps.

use time::OffsetDateTime;

/// Now as RFC 3339 UTC with a fixed six-digit fraction, e.g.
/// `2025-01-31T12:00:00.123456Z`.
///
/// Built from the date/time accessors rather than `time`'s formatting
/// feature, which this crate does not enable itself; a fixed width also keeps
/// the lines sortable as text.
pub fn now_rfc3339() -> String {
    format_rfc3339(OffsetDateTime::now_utc())
}

pub fn format_rfc3339(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.microsecond()
    )
}

#[cfg(test)]
mod tests {
    use time::format_description::well_known::Rfc3339;

    use super::*;

    #[test]
    fn formats_utc_with_microseconds_and_parses_back() {
        let t = OffsetDateTime::from_unix_timestamp_nanos(1_700_000_000_000_001_000).unwrap();
        let text = format_rfc3339(t);
        assert_eq!(text, "2023-11-14T22:13:20.000001Z");
        assert_eq!(OffsetDateTime::parse(&text, &Rfc3339).unwrap(), t);
    }

    #[test]
    fn now_is_parseable() {
        let text = now_rfc3339();
        OffsetDateTime::parse(&text, &Rfc3339).unwrap();
    }
}
