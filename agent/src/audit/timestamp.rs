//! Record timestamps.

use time::{
    OffsetDateTime, UtcOffset,
    format_description::{FormatItem, well_known::Rfc3339},
    macros::format_description,
};

/// RFC 3339 in UTC with a fixed six-digit fraction: fixed width keeps the
/// lines sortable as text.
const MICROS_UTC: &[FormatItem<'_>] =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z");

/// Now, e.g. `2025-01-31T12:00:00.123456Z`.
pub fn now_rfc3339() -> String {
    format_rfc3339(OffsetDateTime::now_utc())
}

pub fn format_rfc3339(t: OffsetDateTime) -> String {
    let t = t.to_offset(UtcOffset::UTC);
    // Only a year outside 0..=9999 fails the fixed format; RFC 3339 cannot
    // show those either, and the well-known format says so in its output.
    t.format(MICROS_UTC)
        .or_else(|_| t.format(&Rfc3339))
        .unwrap_or_else(|e| format!("unformattable time: {e}"))
}

#[cfg(test)]
mod tests {
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
