//! Credentials in command lines: `curl -H "Authorization: Bearer …"` puts a token in argv,
//! where /proc shows it to the agent. Recorded command lines have credential-shaped values
//! replaced (JWTs, the word after `Bearer`/`Basic`, `token=`/`password=`-style values), and
//! the exact token a request carried, whatever its shape. The record says it was done. Pure.
#![forbid(unsafe_code)]

use std::sync::LazyLock;

use regex::Regex;

static PATTERNS: LazyLock<[(Regex, &'static str); 3]> = LazyLock::new(|| {
    [
        (
            Regex::new(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")
                .expect("valid regex"),
            "[REDACTED:jwt]",
        ),
        (
            Regex::new(r"(?i)\b(bearer|basic)(\s+)[A-Za-z0-9._~+/=-]{8,}").expect("valid regex"),
            "$1$2[REDACTED:credential]",
        ),
        (
            Regex::new(
                r"(?i)\b(token|access_token|api_key|apikey|api-key|secret|password|passwd)(=|:\s*)[^\s&]{4,}",
            )
            .expect("valid regex"),
            "$1$2[REDACTED:credential]",
        ),
    ]
});

/// Replaces credential-shaped values in each argument. Returns whether anything was replaced.
pub fn credentials(args: &mut [String]) -> bool {
    let mut changed = false;
    for arg in args.iter_mut() {
        for (re, with) in PATTERNS.iter() {
            if re.is_match(arg) {
                *arg = re.replace_all(arg, *with).into_owned();
                changed = true;
            }
        }
    }
    changed
}

/// Replaces every occurrence of `secret` (a token a request carried) in the arguments.
pub fn secret(args: &mut [String], secret: &str, label: &str) -> bool {
    if secret.len() < 4 {
        return false;
    }
    let mut changed = false;
    for arg in args.iter_mut() {
        if arg.contains(secret) {
            *arg = arg.replace(secret, label);
            changed = true;
        }
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn credential_shapes_are_replaced() {
        let mut a = args(&[
            "curl",
            "-H",
            "Authorization: Bearer abcdefgh12345678",
            "--header=x: eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl",
            "https://x/?api_key=AKIA1234&x=1",
            "--password=hunter22",
        ]);
        assert!(credentials(&mut a));
        assert_eq!(a[2], "Authorization: Bearer [REDACTED:credential]");
        assert_eq!(a[3], "--header=x: [REDACTED:jwt]");
        assert_eq!(a[4], "https://x/?api_key=[REDACTED:credential]&x=1");
        assert_eq!(a[5], "--password=[REDACTED:credential]");
    }

    #[test]
    fn ordinary_arguments_stay() {
        let mut a = args(&[
            "python3",
            "client.py",
            "http://127.0.0.1:8811/mcp",
            "legacy",
            "--token-file",
            "/run/t",
        ]);
        let before = a.clone();
        assert!(!credentials(&mut a));
        assert_eq!(a, before);
    }

    #[test]
    fn the_requests_own_token_whatever_its_shape() {
        let mut a = args(&["tool", "--key", "sk-live-OPAQUE0123"]);
        assert!(secret(&mut a, "sk-live-OPAQUE0123", "[REDACTED:token]"));
        assert_eq!(a[2], "[REDACTED:token]");
        assert!(!secret(&mut a, "abc", "x"), "too short to be a token");
    }
}
