//! The masking engine's first question about a string: which rules could match it? The
//! engine's `RegexSet` answers it with a lazy DFA that reads every byte of every string (about
//! 2 ns a byte on the machines measured, whatever the arrangement of the set). For ASCII text
//! this module gives the same answer, the same set members, mostly with SIMD:
//!
//! - **Keywords.** Teddy (aho-corasick's SIMD searcher) looks for three bytes of each keyword,
//!   its rarest (`api_key` by `i_k`), over an ASCII-lowercased copy of the text, made up to
//!   16 KiB at a time into a buffer each thread keeps; one-byte keywords (`@`, `+`) are a
//!   `memchr`. Teddy has no case-insensitive mode, and aho-corasick's ASCII case folding falls
//!   back to a byte-at-a-time automaton: hence the copy. Only a string where some window
//!   appears is then read by an automaton over the whole keywords, which names the members.
//! - **Patterns without keywords** (card numbers, IBANs, SSNs) get a gate derived from the
//!   pattern itself: every byte a match can hold belongs to the pattern's byte class (the
//!   union of everything it can consume), and a match is at least the pattern's minimum length
//!   long. So a match lies inside a run of class bytes at least that long, and the pattern runs
//!   only over such runs (with the characters around them, for `\b`). One pass finds the runs
//!   of all the gates' classes together by looking at every `min`-th byte, so prose (letters,
//!   where a card's class is digits, spaces and dashes) costs a fraction of a read.
//!
//! Strings that are not ASCII go to the set as before: there, Unicode case folding makes a
//! keyword match text that ASCII case folding would miss (`ſ` folds to `s`, the Kelvin sign
//! to `k`).
#![forbid(unsafe_code)]

use aho_corasick::{AhoCorasick, MatchKind, packed};
use regex::Regex;
use regex_syntax::hir::{Class, Hir, HirKind};

/// The bytes of a keyword that Teddy looks for (its fingerprint is three bytes long).
const WINDOW: usize = 3;

/// At most this many windows: with the default pack's 37 apart, Teddy took 105 M instructions
/// over the masking benchmark's 1 MiB sizes, with 32 shared ones 48 to 62 M (callgrind).
const TEDDY_PATTERNS: usize = 32;

/// Strings shorter than this skip the windows.
const SHORT: usize = 32;

/// Bytes lowercased at a time (windows are at most three bytes, so chunks overlap by two).
const CHUNK: usize = 16 * 1024;

thread_local! {
    /// The lowercased copy, kept per thread: a buffer on the stack would be zeroed on every
    /// call, which cost more than the search (most strings are a few hundred bytes).
    static LOWERED: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(Vec::with_capacity(CHUNK));
}

/// One member of the engine's set, in its order.
pub(super) enum Member<'a> {
    /// A rule's keywords (the set holds them as a case-insensitive alternation).
    Keywords(&'a [String]),
    /// A rule's pattern, for a rule without keywords.
    Pattern(&'a str),
}

#[derive(Debug)]
pub(super) struct Prefilter {
    windows: Windows,
    /// Every keyword, ASCII case-insensitive, with overlapping matches: which members hit.
    keywords: Option<AhoCorasick>,
    /// Keyword (the automaton's pattern) to the members that hold it.
    keyword_members: Vec<Vec<usize>>,
    gates: Gates,
}

impl Prefilter {
    /// `None` when the members hold something this cannot judge exactly (an empty or non-ASCII
    /// keyword, a pattern that does not parse): the set then answers alone.
    pub(super) fn new(members: &[Member<'_>]) -> Option<Self> {
        let mut keywords: Vec<String> = Vec::new();
        let mut keyword_members: Vec<Vec<usize>> = Vec::new();
        let mut patterns = Vec::new();
        for (i, m) in members.iter().enumerate() {
            match m {
                Member::Keywords(ks) => {
                    for k in ks.iter() {
                        if k.is_empty() || !k.is_ascii() {
                            return None;
                        }
                        let k = k.to_ascii_lowercase();
                        match keywords.iter().position(|o| *o == k) {
                            Some(at) => keyword_members[at].push(i),
                            None => {
                                keywords.push(k);
                                keyword_members.push(vec![i]);
                            }
                        }
                    }
                }
                Member::Pattern(p) => patterns.push((i, *p)),
            }
        }
        let exact = if keywords.is_empty() {
            None
        } else {
            Some(
                AhoCorasick::builder()
                    .match_kind(MatchKind::Standard)
                    .ascii_case_insensitive(true)
                    .build(&keywords)
                    .ok()?,
            )
        };
        Some(Prefilter {
            windows: Windows::new(&keywords)?,
            keywords: exact,
            keyword_members,
            gates: Gates::new(patterns)?,
        })
    }

    /// Pushes onto `out` the members that match `s` (in no order, a member at most once per
    /// keyword or pattern that names it): the
    /// members the set's `matches` names. False, with nothing pushed, for text that is not
    /// ASCII: ask the set.
    pub(super) fn candidates(&self, s: &str, out: &mut Vec<usize>) -> bool {
        if !s.is_ascii() {
            return false;
        }
        // Below `SHORT` bytes the automaton alone is cheaper than a copy and Teddy (which
        // would hand strings this short to Rabin-Karp anyway).
        if let Some(exact) = &self.keywords
            && (s.len() < SHORT || self.windows.found_in(s.as_bytes()))
        {
            // Each keyword's members once, and no further than the last keyword still unseen:
            // a string of a million `@` would otherwise list its members a million times.
            // (A bitmask for up to 64 keywords: short strings come here on every call.)
            let n = self.keyword_members.len();
            let (mut small, mut large) = (0u64, if n > 64 { vec![false; n] } else { Vec::new() });
            let mut first_time = |k: usize| {
                if n > 64 {
                    !std::mem::replace(&mut large[k], true)
                } else {
                    let was = small & 1 << k == 0;
                    small |= 1 << k;
                    was
                }
            };
            let mut unseen = n;
            for m in exact.find_overlapping_iter(s) {
                let k = m.pattern().as_usize();
                if first_time(k) {
                    out.extend(&self.keyword_members[k]);
                    unseen -= 1;
                    if unseen == 0 {
                        break;
                    }
                }
            }
        }
        self.gates.matching(s, out);
        true
    }
}

/// What Teddy looks for: some bytes of each keyword. A keyword's presence implies its
/// window's, and a string where a window appears without its keyword is only read once more.
#[derive(Debug)]
struct Windows {
    /// One-byte keywords, both cases.
    bytes: Vec<u8>,
    /// The windows of the longer ones, lowercased.
    longer: Option<Longer>,
    /// The longest window's length: chunks overlap by one less.
    max_len: usize,
}

#[derive(Debug)]
enum Longer {
    /// Teddy's 16-bucket variant, where the CPU has AVX2.
    Packed(packed::Searcher),
    /// Otherwise an automaton over the same windows.
    Automaton(AhoCorasick),
}

impl Windows {
    /// From the lowercased keywords.
    fn new(keywords: &[String]) -> Option<Self> {
        let mut bytes = Vec::new();
        let mut longer: Vec<String> = Vec::new();
        for k in keywords {
            if k.len() == 1 {
                let b = k.as_bytes()[0];
                bytes.extend([b.to_ascii_lowercase(), b.to_ascii_uppercase()]);
            } else {
                longer.push(k.clone());
            }
        }
        bytes.sort_unstable();
        bytes.dedup();
        // Teddy tells candidates apart by their first three bytes, and the keywords' own
        // beginnings are common English ("pri", "sec", "acc", "pas"): most of prose would be
        // candidates to verify. So each keyword is searched by its rarest three bytes.
        let mut longer = windows(&longer, TEDDY_PATTERNS);
        longer.retain(|k| !k.bytes().any(|b| bytes.contains(&b)));
        let max_len = longer.iter().map(String::len).max().unwrap_or(1);
        let longer = if longer.is_empty() {
            None
        } else if let Some(s) = packed::Config::new()
            .match_kind(packed::MatchKind::LeftmostFirst)
            // With 32 patterns Teddy would pick its "slim" variant (8 buckets, 32 bytes a
            // step); here it verified so many more candidates that it took 194 M instructions
            // against the 16-bucket variant's 48 M.
            .only_teddy_fat(Some(true))
            .builder()
            .extend(&longer)
            .build()
        {
            Some(Longer::Packed(s))
        } else {
            Some(Longer::Automaton(
                AhoCorasick::builder()
                    .match_kind(MatchKind::LeftmostFirst)
                    .build(&longer)
                    .ok()?,
            ))
        };
        Some(Windows {
            bytes,
            longer,
            max_len,
        })
    }

    fn found_in(&self, s: &[u8]) -> bool {
        let single = match self.bytes.as_slice() {
            [] => false,
            [a] => memchr::memchr(*a, s).is_some(),
            [a, b] => memchr::memchr2(*a, *b, s).is_some(),
            [a, b, c] => memchr::memchr3(*a, *b, *c, s).is_some(),
            many => s.iter().any(|b| many.binary_search(b).is_ok()),
        };
        if single {
            return true;
        }
        let Some(longer) = &self.longer else {
            return false;
        };
        if s.len() < 2 {
            return false;
        }
        LOWERED.with_borrow_mut(|buf| {
            let mut at = 0;
            loop {
                let end = (at + CHUNK).min(s.len());
                // Sized first, then written branch-free, so that the loop vectorises
                // (`extend` over a mapped iterator and `make_ascii_lowercase` did not).
                let src = &s[at..end];
                buf.resize(src.len(), 0);
                for (d, &b) in buf.iter_mut().zip(src) {
                    *d = b | (u8::from(b.wrapping_sub(b'A') < 26) << 5);
                }
                let hit = match longer {
                    Longer::Packed(p) => p.find(&buf[..]).is_some(),
                    Longer::Automaton(a) => a.is_match(&buf[..]),
                };
                if hit {
                    return true;
                }
                if end == s.len() {
                    return false;
                }
                // A window across the chunk's end is whole in the next one.
                at = end - (self.max_len - 1);
            }
        })
    }
}

/// The patterns without keywords: one pass finds the runs of bytes any of them can hold that
/// are as long as the shortest of their matches; each pattern then looks only inside those.
#[derive(Debug)]
struct Gates {
    /// With the member each stands for.
    gates: Vec<(usize, Gate)>,
    /// The union of the gates' classes.
    union: Class256,
    /// The shortest of their minimum lengths (at least 1).
    min: usize,
    /// Patterns that can match an empty string: run over the whole text.
    whole: Vec<(usize, Regex)>,
}

type Class256 = [bool; 256];

impl Gates {
    fn new(patterns: Vec<(usize, &str)>) -> Option<Self> {
        let mut all = Gates {
            gates: Vec::new(),
            union: [false; 256],
            min: usize::MAX,
            whole: Vec::new(),
        };
        for (member, p) in patterns {
            let gate = Gate::new(p)?;
            if gate.min == 0 {
                all.whole.push((member, gate.regex));
                continue;
            }
            for (u, &c) in all.union.iter_mut().zip(gate.class.iter()) {
                *u |= c;
            }
            all.min = all.min.min(gate.min);
            all.gates.push((member, gate));
        }
        Some(all)
    }

    /// Pushes the members whose pattern matches `s`.
    fn matching(&self, s: &str, out: &mut Vec<usize>) {
        out.extend(
            self.whole
                .iter()
                .filter(|(_, r)| r.is_match(s))
                .map(|(m, _)| m),
        );
        if self.gates.is_empty() {
            return;
        }
        let b = s.as_bytes();
        let mut hit = 0u64;
        let mut at = 0;
        while let Some((start, end)) = next_run(b, &self.union, self.min, at) {
            for (n, (member, gate)) in self.gates.iter().enumerate() {
                // A pattern found once need not be looked for again (bit 63 stands for the
                // 64th gate and any past it, which are then always looked for).
                let bit = 1u64 << n.min(63);
                if (n >= 63 || hit & bit == 0) && gate.matches_within(s, start, end) {
                    hit |= bit;
                    out.push(*member);
                }
            }
            at = end + 1;
        }
    }
}

/// The windows to search for `keywords`: each keyword's rarest, then, while there are more
/// than `most`, two groups of keywords share one window found in all of them (`passwd` and
/// `password` by `ssw`, `api_key` and `private_key` by `_ke`), the pair whose shared window is
/// rarest first. Teddy's fast variant takes at most 32 patterns.
fn windows(keywords: &[String], most: usize) -> Vec<String> {
    // (window, the keywords it stands for)
    let mut groups: Vec<(String, Vec<&str>)> = Vec::new();
    for k in keywords {
        let w = rarest_window(k, WINDOW);
        match groups.iter_mut().find(|(g, _)| g == w) {
            Some((_, members)) => members.push(k),
            None => groups.push((w.to_owned(), vec![k])),
        }
    }
    // A window holding another's is found whenever that one is: its keywords join that group
    // (so that a later merge still finds a window in each of them).
    let mut i = 0;
    while i < groups.len() {
        let holder = &groups[i].0;
        match (0..groups.len()).find(|&j| j != i && holder.contains(groups[j].0.as_str())) {
            Some(j) => {
                let (_, moved) = groups.remove(i);
                let j = if j > i { j - 1 } else { j };
                groups[j].1.extend(moved);
            }
            None => i += 1,
        }
    }
    while groups.len() > most {
        let mut best: Option<(f64, usize, usize, String)> = None;
        for i in 0..groups.len() {
            for j in i + 1..groups.len() {
                let members = groups[i].1.iter().chain(&groups[j].1);
                let Some((w, shared)) = shared_window(members.copied().collect(), WINDOW) else {
                    continue;
                };
                // What the merge adds to the text that passes, roughly.
                let score = shared - window_weight(&groups[i].0) - window_weight(&groups[j].0);
                if best.as_ref().is_none_or(|b| score < b.0) {
                    best = Some((score, i, j, w));
                }
            }
        }
        let Some((_, i, j, w)) = best else {
            break;
        };
        let (_, moved) = groups.remove(j);
        groups[i].0 = w;
        groups[i].1.extend(moved);
    }
    groups.into_iter().map(|(w, _)| w).collect()
}

/// The rarest `len` bytes found in every one of `keywords`, with its weight.
fn shared_window(keywords: Vec<&str>, len: usize) -> Option<(String, f64)> {
    let first = keywords.first()?;
    (0..=first.len().checked_sub(len)?)
        .map(|at| &first[at..at + len])
        .filter(|w| keywords.iter().all(|k| k.contains(w)))
        .map(|w| (w.to_owned(), window_weight(w)))
        .min_by(|a, b| a.1.total_cmp(&b.1))
}

/// The `len` bytes of `keyword` least likely in text (the whole keyword when shorter).
fn rarest_window(keyword: &str, len: usize) -> &str {
    if keyword.len() <= len {
        return keyword;
    }
    // Keywords are ASCII here, so every offset is a character boundary.
    let best = (0..=keyword.len() - len)
        .min_by(|&x, &y| {
            window_weight(&keyword[x..x + len]).total_cmp(&window_weight(&keyword[y..y + len]))
        })
        .unwrap_or(0);
    &keyword[best..best + len]
}

/// How likely `window` is in text: the product of its bytes' rough shares in English prose,
/// logs and code, lowercased (spaces and `e` are everywhere, `_`, `=` and `@` rare).
fn window_weight(window: &str) -> f64 {
    fn weight(b: u8) -> f64 {
        f64::from(match b {
            b' ' => 150,
            b'e' => 100,
            b't' => 75,
            b'a' => 65,
            b'o' => 62,
            b'i' => 60,
            b'n' => 57,
            b's' => 53,
            b'r' => 50,
            b'h' => 42,
            b'l' => 35,
            b'd' => 33,
            b'c' => 27,
            b'u' => 24,
            b'm' => 22,
            b'f' => 19,
            b'p' => 18,
            b'g' => 17,
            b'w' | b'y' => 15,
            b'b' => 12,
            b'.' | b'\n' => 10,
            b'v' => 9,
            b'0'..=b'9' | b',' => 8,
            b'k' => 6,
            b'-' | b'"' => 5,
            b'_' | b'/' | b':' => 4,
            b'(' | b')' | b'\'' | b'=' => 3,
            b'x' | b'j' => 2,
            _ => 1,
        })
    }
    let product: f64 = window.bytes().map(weight).product();
    // Letters alone make word fragments ("key", "tok", "bea"), far commoner than the
    // product of their letters says.
    if window.bytes().all(|b| b.is_ascii_alphabetic()) {
        product * 20.0
    } else {
        product
    }
}

/// A pattern without keywords, run only over the runs of its class that are long enough.
#[derive(Debug)]
struct Gate {
    /// The bytes a match can hold.
    class: Class256,
    /// The shortest match, in bytes; 0 when it can match an empty string (or none at all).
    min: usize,
    regex: Regex,
}

impl Gate {
    fn new(pattern: &str) -> Option<Self> {
        // The parser's defaults are the ones `Regex::new` uses (Unicode on, case-sensitive).
        let hir = regex_syntax::Parser::new().parse(pattern).ok()?;
        let mut class = [false; 256];
        consumed(&hir, &mut class);
        // A run's edges must fall between characters: a class with one byte of a multi-byte
        // character gets them all, so a run never ends inside one.
        if class[0x80..].iter().any(|&b| b) {
            class[0x80..].fill(true);
        }
        Some(Gate {
            class,
            min: hir.properties().minimum_len().unwrap_or(0),
            regex: Regex::new(pattern).ok()?,
        })
    }

    /// Whether the pattern matches inside `from..to`, a run of the union's class (so the
    /// bytes just outside it are outside this class too).
    fn matches_within(&self, s: &str, from: usize, to: usize) -> bool {
        let b = &s.as_bytes()[..to];
        let mut at = from;
        while let Some((start, end)) = next_run(b, &self.class, self.min, at) {
            if self.run_matches(s, start, end) {
                return true;
            }
            at = end + 1;
        }
        false
    }

    /// Whether the pattern matches within `start..end`: the search starts at `start` (the
    /// regex sees what comes before, for look-behind) and the text is cut after the character
    /// at `end`, which is outside the class and so cannot be part of a match, but is what a
    /// `\b` at the run's end looks at.
    fn run_matches(&self, s: &str, start: usize, end: usize) -> bool {
        let stop = end + s[end..].chars().next().map_or(0, char::len_utf8);
        self.regex.is_match_at(&s[..stop], start)
    }

    #[cfg(test)]
    fn matches(&self, s: &str) -> bool {
        self.matches_within(s, 0, s.len())
    }
}

/// The first maximal run of `class` bytes at least `n` long (`n` > 0) that starts at or after
/// `at`, where `at` is 0 or follows a byte outside the class. Looks at every `n`-th byte and
/// around the ones inside the class, so text that rarely holds the class is mostly skipped.
fn next_run(b: &[u8], class: &Class256, n: usize, mut at: usize) -> Option<(usize, usize)> {
    let inside = |i: usize| class[b[i] as usize];
    while at + n <= b.len() {
        let probe = at + n - 1;
        if !inside(probe) {
            at = probe + 1;
            continue;
        }
        let mut start = probe;
        while start > at && inside(start - 1) {
            start -= 1;
        }
        if start > at {
            // The run through the probe begins at `start`, too late to be `n` long by the
            // probe: look again `n` bytes on from where it begins.
            at = start;
            continue;
        }
        let mut end = probe + 1;
        while end < b.len() && inside(end) {
            end += 1;
        }
        return Some((at, end));
    }
    None
}

/// Marks every byte `hir` can consume. Look-arounds consume none.
fn consumed(hir: &Hir, class: &mut [bool; 256]) {
    match hir.kind() {
        HirKind::Empty | HirKind::Look(_) => {}
        HirKind::Literal(lit) => lit.0.iter().for_each(|&b| class[b as usize] = true),
        HirKind::Class(Class::Unicode(c)) => {
            for r in c.iter() {
                let (lo, hi) = (u32::from(r.start()), u32::from(r.end()));
                for b in lo..=hi.min(0x7f) {
                    class[b as usize] = true;
                }
                if hi > 0x7f {
                    class[0x80..].fill(true);
                }
            }
        }
        HirKind::Class(Class::Bytes(c)) => {
            for r in c.iter() {
                for b in r.start()..=r.end() {
                    class[b as usize] = true;
                }
            }
        }
        HirKind::Repetition(r) => consumed(&r.sub, class),
        HirKind::Capture(c) => consumed(&c.sub, class),
        HirKind::Concat(hs) | HirKind::Alternation(hs) => {
            hs.iter().for_each(|h| consumed(h, class));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(p: &str) -> Gate {
        Gate::new(p).expect("the pattern parses")
    }

    #[test]
    fn a_gate_holds_the_bytes_a_match_can_hold_and_its_shortest_length() {
        let g = gate(r"\b\d{3}-\d{2}-\d{4}\b");
        assert_eq!(g.min, 11);
        assert!(g.class[b'7' as usize] && g.class[b'-' as usize]);
        assert!(!g.class[b' ' as usize] && !g.class[b'a' as usize]);
        // `\d` is Unicode: other scripts' digits are multi-byte, so every high byte counts.
        assert!(g.class[0x80] && g.class[0xff]);
        let ascii = gate(r"(?-u:\d){4}");
        assert!(!ascii.class[0x80]);
    }

    #[test]
    fn a_gate_finds_a_match_anywhere_and_only_inside_a_long_enough_run() {
        let g = gate(r"\b\d{3}-\d{2}-\d{4}\b");
        for (s, want) in [
            ("123-45-6789", true),
            ("ssn 123-45-6789", true),
            ("123-45-6789 at the start", true),
            ("a 2026-11-26 date", false),
            ("x123-45-6789", false),
            ("123-45-67890", false),
            ("1-123-45-6789-", true),
            ("ab 12 123-45-6789", true),
            ("", false),
            ("12", false),
            ("----------- 123-45-6789", true),
        ] {
            assert_eq!(g.matches(s), want, "{s:?}");
            assert_eq!(g.matches(s), g.regex.is_match(s), "{s:?}");
        }
    }

    #[test]
    fn a_word_boundary_at_a_runs_end_sees_the_character_after_it() {
        // `é` is a word character and outside an ASCII class: `\b` must not hold before it.
        let g = gate(r"(?-u:[0-9]){4}\b");
        assert!(!g.class[0x80]);
        assert!(!g.matches("1234é"));
        assert!(g.matches("1234 é"));
        assert!(!g.regex.is_match("1234é"));
    }

    #[test]
    fn keywords_are_found_in_any_case_and_across_chunks() {
        let k = Windows::new(&["github_pat_".into(), "aws".into(), "@".into()]).expect("they suit");
        assert!(k.found_in(b"see GITHUB_PAT_x"));
        assert!(k.found_in(b"an AwS key"));
        assert!(k.found_in(b"a@b"));
        assert!(!k.found_in(b"nothing here at all"));
        for at in [CHUNK - 12, CHUNK - 6, CHUNK - 1, CHUNK, 2 * CHUNK - 20] {
            let mut s = vec![b'x'; 3 * CHUNK];
            s[at..at + 11].copy_from_slice(b"GitHub_Pat_");
            assert!(k.found_in(&s), "at {at}");
        }
    }

    #[test]
    fn each_keyword_holds_one_of_the_windows_and_there_are_at_most_32() {
        let shared = windows(&["password".into(), "passwd".into()], 1);
        assert_eq!(shared, ["ssw"]);
        assert_eq!(rarest_window("api_key", 3), "i_k");
        let p = crate::policy::Policy::embedded_default().unwrap();
        let keywords: Vec<String> = p
            .masking
            .iter()
            .flat_map(|r| r.keywords.iter().map(|k| k.to_ascii_lowercase()))
            .filter(|k| k.len() > 1)
            .collect();
        let found = windows(&keywords, TEDDY_PATTERNS);
        assert!(found.len() <= TEDDY_PATTERNS, "{found:?}");
        for k in &keywords {
            assert!(
                found.iter().any(|w| k.contains(w.as_str())),
                "{k} has no window"
            );
        }
        // With room for all, each keeps its own rarest window.
        assert!(windows(&keywords, usize::MAX).len() > found.len());
    }

    #[test]
    fn a_keyword_repeated_a_million_times_names_its_member_once() {
        let (at, url) = (["@".to_string()], ["://".to_string(), "@".to_string()]);
        let p = Prefilter::new(&[Member::Keywords(&at), Member::Keywords(&url)]).unwrap();
        let mut out = Vec::new();
        assert!(p.candidates(&"@".repeat(1 << 20), &mut out));
        out.sort_unstable();
        assert_eq!(out, [0, 1]);
    }

    #[test]
    fn more_than_64_keywords_are_each_named_once_too() {
        let lists: Vec<[String; 1]> = (0..70).map(|i| [format!("kw{i:02}z")]).collect();
        let members: Vec<Member<'_>> = lists.iter().map(|k| Member::Keywords(k)).collect();
        let p = Prefilter::new(&members).unwrap();
        let mut out = Vec::new();
        assert!(p.candidates("KW05z kw69z kw05z, not kw7z", &mut out));
        assert_eq!(out, [5, 69]);
    }

    #[test]
    fn keywords_it_cannot_judge_leave_the_question_to_the_set() {
        let empty = [String::new()];
        assert!(Prefilter::new(&[Member::Keywords(&empty)]).is_none());
        let german = ["straße".to_string()];
        assert!(Prefilter::new(&[Member::Keywords(&german)]).is_none());
        let secret = ["secret".to_string()];
        let p = Prefilter::new(&[Member::Keywords(&secret)]).expect("ascii keywords suit");
        let mut out = Vec::new();
        assert!(!p.candidates("the ſecret", &mut out));
        assert!(p.candidates("the SeCrEt", &mut out));
        assert_eq!(out, [0]);
    }
}
