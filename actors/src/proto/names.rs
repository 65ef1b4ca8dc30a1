//! The syntax of usernames, passwords and message ids (contract section 1).

/// Longest username, in characters (all ASCII, so also bytes).
pub const MAX_USERNAME: usize = 64;
/// Longest password, in bytes.
pub const MAX_PASSWORD: usize = 1024;
/// Longest message id, in bytes.
pub const MAX_MESSAGE_ID: usize = 256;

/// 1–64 characters from `A–Z a–z 0–9 . _ -`.
pub fn valid_username(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_USERNAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// 1–1024 bytes of UTF-8 with no CR or LF.
pub fn valid_password(password: &str) -> bool {
    !password.is_empty() && password.len() <= MAX_PASSWORD && !password.contains(['\r', '\n'])
}

/// 1–256 bytes of UTF-8 with no CR or LF.
pub fn valid_message_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_MESSAGE_ID && !id.contains(['\r', '\n'])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames() {
        assert!(valid_username("alice"));
        assert!(valid_username("A.b_c-9"));
        assert!(valid_username(&"a".repeat(64)));
        assert!(!valid_username(&"a".repeat(65)));
        assert!(!valid_username(""));
        assert!(!valid_username("al ice"));
        assert!(!valid_username("ålice"));
        assert!(!valid_username("a/b"));
    }

    #[test]
    fn passwords_and_ids() {
        assert!(valid_password("pässword with spaces"));
        assert!(!valid_password("a\nb"));
        assert!(!valid_password(""));
        assert!(!valid_password(&"x".repeat(1025)));
        assert!(valid_message_id("1700000000-0.25-SUBJECT"));
        assert!(!valid_message_id("a\rb"));
        assert!(!valid_message_id(&"x".repeat(257)));
    }
}
