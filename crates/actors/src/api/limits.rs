//! The limits of every field the API accepts (over HTTP and from client programs), in one
//! place: the request layer enforces them and the OpenAPI document states them (the node
//! crate's `openapi.rs` reads the same constants).
//! String lengths count Unicode scalar values (what JSON Schema's `maxLength` counts).

/// Ids (user, item, event, request) and kinds: 1..=256 characters, no control characters.
pub const MAX_ID_CHARS: usize = 256;
/// Item text.
pub const MAX_TEXT_CHARS: usize = 16_384;
/// Categories per item, and characters per category.
pub const MAX_CATEGORIES: usize = 32;
pub const MAX_CATEGORY_CHARS: usize = 128;
/// Attributes per item, characters per key and per value.
pub const MAX_ATTRIBUTES: usize = 64;
pub const MAX_ATTRIBUTE_KEY_CHARS: usize = 128;
pub const MAX_ATTRIBUTE_VALUE_CHARS: usize = 1024;
/// Largest magnitude of an event's `value` (stored as a 32-bit float).
pub const MAX_ABS_VALUE: f64 = 1e9;
/// `exclude` parameters per request, and characters per parameter (each a comma-separated
/// list of ids).
pub const MAX_EXCLUDE_PARAMS: usize = 100;
pub const MAX_EXCLUDE_CHARS: usize = 4096;
/// Excluded item ids in one client call (HTTP bounds them by its parameter limits).
pub const MAX_EXCLUDE_IDS: usize = 10_000;
/// Largest blend weight (what `weights_pattern` admits over HTTP).
pub const MAX_WEIGHT: f32 = 1e9;
/// Largest `min_offset` (JSON Schema's int64 maximum).
pub const MAX_OFFSET: u64 = i64::MAX as u64;
/// The pattern of strings without control characters (C0, DEL, C1: what
/// `char::is_control` refuses).
pub const NO_CONTROL_PATTERN: &str = "^[^\\u0000-\\u001F\\u007F-\\u009F]*$";
/// A blend weight: a decimal number >= 0 without exponent, sign or spaces.
const WEIGHT: &str = "(0|[1-9][0-9]{0,8})(\\.[0-9]{1,6})?";

/// The pattern of `weights`: three or four weights separated by commas (als, content,
/// popularity and optionally item_item; three leave item_item at 0).
pub fn weights_pattern() -> String {
    format!("^{WEIGHT},{WEIGHT},{WEIGHT}(,{WEIGHT})?$")
}

/// Checks a string field against a length range in characters and refuses control
/// characters. `what` names the field in the message.
pub fn check_text(what: &str, v: &str, min: usize, max: usize) -> Result<(), String> {
    let n = v.chars().count();
    if n < min {
        return Err(if min == 1 {
            format!("{what} must not be empty")
        } else {
            format!("{what} must have at least {min} characters")
        });
    }
    if n > max {
        return Err(format!("{what} has {n} characters; the limit is {max}"));
    }
    if v.chars().any(char::is_control) {
        return Err(format!("{what} contains control characters"));
    }
    Ok(())
}

/// Checks an id or kind.
pub fn check_id(what: &str, v: &str) -> Result<(), String> {
    check_text(what, v, 1, MAX_ID_CHARS)
}

/// Parses one blend weight exactly as [`weights_pattern`] allows.
fn parse_weight(s: &str) -> Option<f32> {
    let (int, frac) = match s.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (s, None),
    };
    let int_ok = int == "0"
        || (!int.is_empty()
            && int.len() <= 9
            && !int.starts_with('0')
            && int.bytes().all(|b| b.is_ascii_digit()));
    let frac_ok =
        frac.is_none_or(|f| !f.is_empty() && f.len() <= 6 && f.bytes().all(|b| b.is_ascii_digit()));
    if int_ok && frac_ok {
        s.parse().ok()
    } else {
        None
    }
}

/// Parses `weights` (als,content,popularity[,item_item]) exactly as [`weights_pattern`]
/// allows; a missing item_item weight is 0.
pub fn parse_weights(s: &str) -> Result<[f32; 4], String> {
    let parts: Vec<&str> = s.split(',').collect();
    let bad = || {
        format!("weights must be three or four decimal numbers >= 0 separated by commas (als,content,popularity[,item_item]), like 0.3,0.1,0.1,0.5; got `{s}`")
    };
    if !(3..=4).contains(&parts.len()) {
        return Err(bad());
    }
    let mut w = [0f32; 4];
    for (slot, p) in w.iter_mut().zip(parts) {
        *slot = parse_weight(p).ok_or_else(bad)?;
    }
    Ok(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_follow_the_pattern_exactly() {
        assert_eq!(parse_weights("0.8,0.1,0.1").unwrap(), [0.8, 0.1, 0.1, 0.0]);
        assert_eq!(parse_weights("1,0,0").unwrap(), [1.0, 0.0, 0.0, 0.0]);
        assert_eq!(parse_weights("0,0,0").unwrap(), [0.0; 4]);
        assert_eq!(parse_weights("0,0,0,1").unwrap(), [0.0, 0.0, 0.0, 1.0]);
        for bad in [
            "",
            "1,2",
            "1,2,3,4,5",
            "1,2,3,",
            "-1,0,0",
            "1e3,0,0",
            "inf,0,0",
            "NaN,0,0",
            " 1,0,0",
            "01,0,0",
            "1.,0,0",
            ".5,0,0",
            "+1,0,0",
            "1.1234567,0,0",
            "1234567890,0,0",
        ] {
            assert!(parse_weights(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn text_checks_count_characters_and_refuse_controls() {
        assert!(check_id("user", "é".repeat(256).as_str()).is_ok());
        assert!(check_id("user", "é".repeat(257).as_str()).is_err());
        assert!(check_id("user", "").unwrap_err().contains("empty"));
        assert!(check_id("user", "a\u{85}b")
            .unwrap_err()
            .contains("control"));
        assert!(check_text("text", "", 0, 10).is_ok());
    }
}
