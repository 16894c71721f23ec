//! Checks that tell a real identifier from a look-alike, so that masking does not fire on
//! every long number: Luhn for payment cards, ISO 13616 mod-97 for IBANs, the SSA's rules
//! for US social security numbers, and Shannon entropy for random-looking secrets. Pure.
#![forbid(unsafe_code)]

use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Validator {
    Luhn,
    Iban,
    UsSsn,
    /// At least `entropy_min` bits per character (the rule's setting; 3.5 by default).
    Entropy,
}

impl Validator {
    pub fn check(self, text: &str, entropy_min: f64) -> bool {
        match self {
            Validator::Luhn => luhn(text),
            Validator::Iban => iban(text),
            Validator::UsSsn => us_ssn(text),
            Validator::Entropy => entropy(text) >= entropy_min,
        }
    }
}

/// Luhn over the digits (separators ignored), for 12 to 19 digits.
pub fn luhn(text: &str) -> bool {
    let digits: Vec<u32> = text.chars().filter_map(|c| c.to_digit(10)).collect();
    if !(12..=19).contains(&digits.len()) {
        return false;
    }
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            if i % 2 == 1 {
                let d2 = d * 2;
                if d2 > 9 { d2 - 9 } else { d2 }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// ISO 13616: country letters, two check digits, up to 30 alphanumerics; moved and read as a
/// number, it is 1 modulo 97. Spaces are ignored.
pub fn iban(text: &str) -> bool {
    let s: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    if !(15..=34).contains(&s.len()) || !s.is_ascii() {
        return false;
    }
    let (head, tail) = s.split_at(4);
    if !head[..2].chars().all(|c| c.is_ascii_uppercase())
        || !head[2..].chars().all(|c| c.is_ascii_digit())
    {
        return false;
    }
    let mut rem: u32 = 0;
    for c in tail.chars().chain(head.chars()) {
        let v = match c {
            '0'..='9' => c as u32 - '0' as u32,
            'A'..='Z' => c as u32 - 'A' as u32 + 10,
            _ => return false,
        };
        rem = if v < 10 {
            (rem * 10 + v) % 97
        } else {
            (rem * 100 + v) % 97
        };
    }
    rem == 1
}

/// AAA-GG-SSSS where the area is not 000, 666 or 9xx, the group not 00, the serial not 0000.
pub fn us_ssn(text: &str) -> bool {
    let parts: Vec<&str> = text.split('-').collect();
    let [area, group, serial] = parts.as_slice() else {
        return false;
    };
    let all_digits = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit());
    all_digits(area, 3)
        && all_digits(group, 2)
        && all_digits(serial, 4)
        && *area != "000"
        && *area != "666"
        && !area.starts_with('9')
        && *group != "00"
        && *serial != "0000"
}

/// Shannon entropy in bits per character.
pub fn entropy(text: &str) -> f64 {
    let n = text.chars().count();
    if n == 0 {
        return 0.0;
    }
    let mut counts = std::collections::HashMap::new();
    for c in text.chars() {
        *counts.entry(c).or_insert(0usize) += 1;
    }
    counts
        .values()
        .map(|&k| {
            let p = k as f64 / n as f64;
            -p * p.log2()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn luhn_cases() {
        assert!(luhn("4111 1111 1111 1111"));
        assert!(luhn("5500-0000-0000-0004"));
        assert!(luhn("378282246310005"));
        assert!(!luhn("4111 1111 1111 1112"), "one digit off");
        assert!(!luhn("1234567890123456"));
        assert!(!luhn("0000"), "too short");
    }

    #[test]
    fn iban_cases() {
        assert!(iban("DE89 3704 0044 0532 0130 00"));
        assert!(iban("GB82WEST12345698765432"));
        assert!(!iban("GB82WEST12345698765433"), "check digits fail");
        assert!(!iban("XX00"));
        assert!(!iban("de89370400440532013000"), "lower-case country");
    }

    #[test]
    fn ssn_cases() {
        assert!(us_ssn("123-45-6789"));
        assert!(!us_ssn("000-45-6789"));
        assert!(!us_ssn("666-45-6789"));
        assert!(!us_ssn("912-45-6789"));
        assert!(!us_ssn("123-00-6789"));
        assert!(!us_ssn("123-45-0000"));
        assert!(!us_ssn("123456789"));
    }

    #[test]
    fn entropy_cases() {
        assert!(entropy("aaaaaaaaaaaaaaaa") < 0.1);
        assert!(entropy("wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY") > 4.0);
        assert!(entropy("passwordpassword") < 3.0);
    }
}
