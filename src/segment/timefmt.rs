//! Instants as `i64` milliseconds since the Unix epoch: parsing RFC 3339 and
//! `YYYY-MM-DD`, and printing RFC 3339 UTC with millisecond precision.

const MS_PER_DAY: i64 = 86_400_000;
const MS_PER_HOUR: i64 = 3_600_000;
const MS_PER_MINUTE: i64 = 60_000;

/// First instant accepted when bounded: 2000-01-01T00:00:00Z.
const BOUND_START_MS: i64 = days_from_civil(2000, 1, 1) * MS_PER_DAY;
/// First instant rejected when bounded: 2101-01-01T00:00:00Z.
const BOUND_END_MS: i64 = days_from_civil(2101, 1, 1) * MS_PER_DAY;

/// Parses RFC 3339 with any offset and 0–9 fraction digits ('T' or 't' separator, 'Z'/'z' or ±HH:MM); a string without offset is invalid. Returns ms since epoch (fraction truncated to ms). None if invalid or outside years 2000..=2100 when `bounded` is true.
pub fn parse_rfc3339_ms(s: &str, bounded: bool) -> Option<i64> {
    let b = s.as_bytes();
    let days = parse_date(b.get(..10)?)?;
    if !matches!(b.get(10), Some(b'T' | b't')) {
        return None;
    }
    let hour = digits(b, 11, 2)?;
    expect(b, 13, b':')?;
    let minute = digits(b, 14, 2)?;
    expect(b, 16, b':')?;
    let second = digits(b, 17, 2)?;
    if hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    let mut i = 19;
    let mut frac_ms = 0;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        let n = i - start;
        if n == 0 || n > 9 {
            return None;
        }
        for k in 0..3 {
            let d = if k < n {
                i64::from(b[start + k] - b'0')
            } else {
                0
            };
            frac_ms = frac_ms * 10 + d;
        }
    }
    let offset_ms = match b.get(i)? {
        b'Z' | b'z' => {
            i += 1;
            0
        }
        sign @ (b'+' | b'-') => {
            let oh = digits(b, i + 1, 2)?;
            expect(b, i + 3, b':')?;
            let om = digits(b, i + 4, 2)?;
            if oh > 23 || om > 59 {
                return None;
            }
            i += 6;
            let magnitude = oh * MS_PER_HOUR + om * MS_PER_MINUTE;
            if *sign == b'-' { -magnitude } else { magnitude }
        }
        _ => return None,
    };
    if i != b.len() {
        return None;
    }
    let ms =
        days * MS_PER_DAY + hour * MS_PER_HOUR + minute * MS_PER_MINUTE + second * 1000 + frac_ms
            - offset_ms;
    if bounded && !(BOUND_START_MS..BOUND_END_MS).contains(&ms) {
        return None;
    }
    Some(ms)
}

/// Parses `YYYY-MM-DD` as 00:00 UTC, or falls back to `parse_rfc3339_ms(s, false)`.
pub fn parse_rule_instant_ms(s: &str) -> Option<i64> {
    if s.len() == 10 {
        return parse_date(s.as_bytes()).map(|days| days * MS_PER_DAY);
    }
    parse_rfc3339_ms(s, false)
}

/// Formats ms since epoch as RFC 3339 UTC with exactly 3 fraction digits and 'Z', e.g. 2026-12-03T10:15:00.123Z (negative ms handled correctly).
///
/// Years outside 0000..=9999 (not representable in RFC 3339) are printed
/// with an explicit sign, ISO 8601 style (`-0001`, `+10000`).
pub fn format_ms(ms: i64) -> String {
    let mut out = String::with_capacity(24);
    write_ms(&mut out, ms);
    out
}

/// Appends [`format_ms`]'s text to `out` without allocating (hot paths render many).
pub fn write_ms(out: &mut String, ms: i64) {
    use std::fmt::Write as _;
    let days = ms.div_euclid(MS_PER_DAY);
    let rem = ms.rem_euclid(MS_PER_DAY);
    let (year, month, day) = civil_from_days(days);
    let hour = rem / MS_PER_HOUR;
    let minute = rem / MS_PER_MINUTE % 60;
    let second = rem / 1000 % 60;
    let milli = rem % 1000;
    if (0..=9999).contains(&year) {
        push_digits(out, year, 4);
    } else {
        let _ = write!(out, "{year:+05}");
    }
    out.push('-');
    push_digits(out, month, 2);
    out.push('-');
    push_digits(out, day, 2);
    out.push('T');
    push_digits(out, hour, 2);
    out.push(':');
    push_digits(out, minute, 2);
    out.push(':');
    push_digits(out, second, 2);
    out.push('.');
    push_digits(out, milli, 3);
    out.push('Z');
}

/// Appends `v` (non-negative) as exactly `width` decimal digits.
fn push_digits(out: &mut String, v: i64, width: u32) {
    let mut div = 10i64.pow(width - 1);
    while div > 0 {
        out.push((b'0' + (v / div % 10) as u8) as char);
        div /= 10;
    }
}

/// Reads `n` ASCII digits at `start`.
fn digits(b: &[u8], start: usize, n: usize) -> Option<i64> {
    let mut v = 0i64;
    for &c in b.get(start..start + n)? {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v * 10 + i64::from(c - b'0');
    }
    Some(v)
}

/// Checks that byte `at` is `want`.
fn expect(b: &[u8], at: usize, want: u8) -> Option<()> {
    (b.get(at) == Some(&want)).then_some(())
}

/// Parses exactly `YYYY-MM-DD` into days since the epoch.
fn parse_date(b: &[u8]) -> Option<i64> {
    if b.len() != 10 {
        return None;
    }
    let year = digits(b, 0, 4)?;
    expect(b, 4, b'-')?;
    let month = digits(b, 5, 2)?;
    expect(b, 7, b'-')?;
    let day = digits(b, 8, 2)?;
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return None;
    }
    Some(days_from_civil(year, month, day))
}

fn is_leap(year: i64) -> bool {
    year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
const fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Proleptic Gregorian (year, month, day) of a day count since 1970-01-01.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::OffsetDateTime;
    use time::format_description::well_known::Rfc3339;

    fn p(s: &str) -> Option<i64> {
        parse_rfc3339_ms(s, false)
    }

    /// Reference value from the `time` crate, floored to ms like our truncation.
    fn reference(s: &str) -> Option<i64> {
        let dt = OffsetDateTime::parse(s, &Rfc3339).ok()?;
        Some(i64::try_from(dt.unix_timestamp_nanos().div_euclid(1_000_000)).unwrap())
    }

    #[test]
    fn bounds_constants() {
        assert_eq!(BOUND_START_MS, 946_684_800_000);
        assert_eq!(BOUND_END_MS, 4_133_980_800_000);
    }

    #[test]
    fn parses_utc_and_epoch() {
        assert_eq!(p("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(p("1970-01-01t00:00:00z"), Some(0));
        assert_eq!(p("2026-12-03T10:15:00.123Z"), Some(1_796_292_900_123));
        assert_eq!(p("1969-12-31T23:59:59.999Z"), Some(-1));
    }

    #[test]
    fn fractions_of_every_length() {
        let base = p("2026-12-03T10:15:00Z").unwrap();
        let cases = [
            ("", 0),
            (".1", 100),
            (".12", 120),
            (".123", 123),
            (".1234", 123),
            (".12345", 123),
            (".123456", 123),
            (".1234567", 123),
            (".12345678", 123),
            (".123456789", 123),
            (".999999999", 999),
            (".000000001", 0),
        ];
        for (frac, ms) in cases {
            let s = format!("2026-12-03T10:15:00{frac}Z");
            assert_eq!(p(&s), Some(base + ms), "{s}");
        }
        assert_eq!(p("2026-12-03T10:15:00.1234567890Z"), None, "10 digits");
        assert_eq!(p("2026-12-03T10:15:00.Z"), None, "empty fraction");
    }

    #[test]
    fn fraction_truncates_before_epoch() {
        // .9999 truncates to .999, i.e. 1 ms before the epoch.
        assert_eq!(p("1969-12-31T23:59:59.9999Z"), Some(-1));
        assert_eq!(p("1969-12-31T23:59:59.0009Z"), Some(-1000));
    }

    #[test]
    fn offsets() {
        let utc = p("2026-12-03T10:15:00Z").unwrap();
        assert_eq!(p("2026-12-03T15:45:00+05:30"), Some(utc));
        assert_eq!(p("2026-12-03T05:15:00-05:00"), Some(utc));
        assert_eq!(p("2026-12-03T10:15:00-00:00"), Some(utc));
        assert_eq!(p("2026-12-03T10:15:00+00:00"), Some(utc));
        assert_eq!(p("2026-12-04T00:14:00+13:59"), Some(utc));
        assert_eq!(p("2026-12-02T20:16:00-13:59"), Some(utc));
        assert_eq!(p("2026-12-03T10:15:00+24:00"), None);
        assert_eq!(p("2026-12-03T10:15:00+05:60"), None);
        assert_eq!(p("2026-12-03T10:15:00+0530"), None);
        assert_eq!(p("2026-12-03T10:15:00+05"), None);
    }

    #[test]
    fn leap_years() {
        assert!(p("2024-02-29T00:00:00Z").is_some());
        assert!(p("2000-02-29T00:00:00Z").is_some());
        assert_eq!(p("2100-02-29T00:00:00Z"), None);
        assert_eq!(p("2026-02-29T00:00:00Z"), None);
        assert_eq!(p("2026-02-30T00:00:00Z"), None);
        assert_eq!(p("2026-04-31T00:00:00Z"), None);
        assert_eq!(
            p("2024-03-01T00:00:00Z").unwrap() - p("2024-02-28T00:00:00Z").unwrap(),
            2 * MS_PER_DAY
        );
    }

    #[test]
    fn rejects_malformed() {
        for s in [
            "",
            "2026-12-03",
            "2026-12-03T10:15:00",
            "2026-12-03T10:15:00.123",
            "2026-12-03 10:15:00Z",
            "2026-12-03_10:15:00Z",
            "2026-12-03T10:15Z",
            "2026-12-03T24:00:00Z",
            "2026-12-03T10:60:00Z",
            "2026-12-03T10:15:60Z",
            "2026-13-03T10:15:00Z",
            "2026-00-03T10:15:00Z",
            "2026-12-00T10:15:00Z",
            "26-12-03T10:15:00Z",
            "+2026-12-03T10:15:00Z",
            "2026-12-03T10:15:00ZZ",
            "2026-12-03T10:15:00Z ",
            " 2026-12-03T10:15:00Z",
            "2026-1２-03T10:15:00Z",
            "2026/12/03T10:15:00Z",
        ] {
            assert_eq!(p(s), None, "{s:?}");
        }
    }

    #[test]
    fn bounded_range_is_utc_years_2000_to_2100() {
        assert_eq!(
            parse_rfc3339_ms("2000-01-01T00:00:00Z", true),
            Some(BOUND_START_MS)
        );
        assert_eq!(parse_rfc3339_ms("1999-12-31T23:59:59.999Z", true), None);
        assert!(parse_rfc3339_ms("2100-12-31T23:59:59.999Z", true).is_some());
        assert_eq!(parse_rfc3339_ms("2101-01-01T00:00:00Z", true), None);
        // Judged by the UTC instant, not the written local year.
        assert_eq!(parse_rfc3339_ms("2000-01-01T00:30:00+01:00", true), None);
        assert!(parse_rfc3339_ms("1999-12-31T23:30:00-01:00", true).is_some());
        assert!(parse_rfc3339_ms("1999-12-31T23:30:00Z", false).is_some());
        assert!(parse_rfc3339_ms("0001-01-01T00:00:00Z", false).is_some());
    }

    #[test]
    fn rule_instants() {
        assert_eq!(parse_rule_instant_ms("1970-01-01"), Some(0));
        assert_eq!(
            parse_rule_instant_ms("2026-12-03"),
            p("2026-12-03T00:00:00Z")
        );
        assert_eq!(
            parse_rule_instant_ms("2024-02-29"),
            p("2024-02-29T00:00:00Z")
        );
        assert_eq!(parse_rule_instant_ms("2026-02-29"), None);
        assert_eq!(parse_rule_instant_ms("2026-12-3"), None);
        assert_eq!(parse_rule_instant_ms("2026-12-03T00:00"), None);
        assert_eq!(
            parse_rule_instant_ms("2026-12-03T10:15:00.123Z"),
            Some(1_796_292_900_123)
        );
        assert_eq!(
            parse_rule_instant_ms("1800-01-01T00:00:00Z"),
            p("1800-01-01T00:00:00Z")
        );
        assert_eq!(parse_rule_instant_ms("yesterday"), None);
    }

    #[test]
    fn formats() {
        assert_eq!(format_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_ms(-1), "1969-12-31T23:59:59.999Z");
        assert_eq!(format_ms(-86_400_000), "1969-12-31T00:00:00.000Z");
        assert_eq!(format_ms(-86_400_001), "1969-12-30T23:59:59.999Z");
        assert_eq!(format_ms(1_796_292_900_123), "2026-12-03T10:15:00.123Z");
        assert_eq!(format_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(format_ms(-62_167_219_200_001), "-0001-12-31T23:59:59.999Z");
        assert_eq!(format_ms(253_402_300_800_000), "+10000-01-01T00:00:00.000Z");
        // Extremes must not panic.
        assert!(format_ms(i64::MIN).starts_with('-'));
        assert!(format_ms(i64::MAX).starts_with('+'));
    }

    #[test]
    fn round_trip() {
        let s = "2026-12-03T10:15:00.123Z";
        assert_eq!(format_ms(p(s).unwrap()), s);
        // Sweep 1600..2400 with an odd step so every field varies.
        let start = p("1600-01-01T00:00:00Z").unwrap();
        let end = p("2400-01-01T00:00:00Z").unwrap();
        let mut ms = start;
        while ms < end {
            let text = format_ms(ms);
            assert_eq!(p(&text), Some(ms), "{text}");
            ms += 99_991_234_567;
        }
    }

    #[test]
    fn agrees_with_time_crate() {
        let cases = [
            "1970-01-01T00:00:00Z",
            "2026-12-03T10:15:00.123Z",
            "2026-12-03T15:45:00.5+05:30",
            "2026-12-03T10:15:00-00:00",
            "2024-02-29T23:59:59.999999999-12:00",
            "1969-12-31T23:59:59.9999Z",
            "1999-01-01T00:00:00.1+14:00",
            "2100-12-31T23:59:59Z",
            "0001-01-01T00:00:00Z",
            "2026-12-03t10:15:00z",
        ];
        for s in cases {
            assert_eq!(p(s), reference(s), "{s}");
        }
        let fmt = time::macros::format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
        );
        for ms in [
            0i64,
            -1,
            1_796_292_900_123,
            951_782_400_000,
            -12_345_678_901,
        ] {
            let dt = OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).unwrap();
            assert_eq!(format_ms(ms), dt.format(&fmt).unwrap());
        }
    }
}
