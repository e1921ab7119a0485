//! `INCRBYFLOAT` arithmetic exactly as Redis does it on x86-64: in C's
//! `long double`, the x87 80-bit extended format (64-bit significand,
//! exponents down to 2^-16445 with subnormals, round to nearest even).
//!
//! Redis parses both operands with `strtold` (correctly rounded), adds them
//! in `long double` and prints the sum with `"%.17Lf"` minus trailing
//! zeros (`ld2string` in human mode). Rust has no such type, and `f64`
//! gives different digits (10.5 + 0.1 prints `10.6` in Redis but
//! `10.59999999999999964` in `f64`), so this module implements the format
//! in software: values are `m * 2^e`, and parsing, addition and printing
//! are exact big-integer computations followed by one rounding, which is
//! what a correctly rounded implementation produces.

use alloc::vec;
use alloc::vec::Vec;
use core::cmp::Ordering;

/// Redis's `MAX_LONG_DOUBLE_CHARS`: longer inputs are not numbers.
const MAX_CHARS: usize = 5 * 1024;
/// Exponent of the smallest subnormal: 2^-16445.
const MIN_LSB_EXP: i64 = -16445;
/// Largest exponent of a significand's top bit.
const MAX_TOP_EXP: i64 = 16383;

/// An x87 extended-precision value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LongDouble {
    Zero {
        neg: bool,
    },
    /// `m * 2^e`, `m != 0`.
    Finite {
        neg: bool,
        m: u64,
        e: i32,
    },
    Inf {
        neg: bool,
    },
    NaN,
}

/// Little-endian base-2^32 natural numbers: just what exact parsing,
/// addition and printing need.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Big(Vec<u32>);

impl Big {
    fn from_u64(v: u64) -> Big {
        let mut b = Big(vec![v as u32, (v >> 32) as u32]);
        b.trim();
        b
    }

    fn trim(&mut self) {
        while self.0.last() == Some(&0) {
            self.0.pop();
        }
    }

    fn is_zero(&self) -> bool {
        self.0.is_empty()
    }

    fn bits(&self) -> u64 {
        match self.0.last() {
            None => 0,
            Some(&top) => (self.0.len() as u64 - 1) * 32 + u64::from(32 - top.leading_zeros()),
        }
    }

    fn bit(&self, i: u64) -> bool {
        self.0
            .get((i / 32) as usize)
            .is_some_and(|&l| l >> (i % 32) & 1 == 1)
    }

    /// Whether any bit below `i` is set.
    fn any_below(&self, i: u64) -> bool {
        let whole = (i / 32) as usize;
        self.0.iter().take(whole).any(|&l| l != 0)
            || (!i.is_multiple_of(32)
                && self
                    .0
                    .get(whole)
                    .is_some_and(|&l| l & ((1u32 << (i % 32)) - 1) != 0))
    }

    fn mul_add_small(&mut self, mul: u32, add: u32) {
        let mut carry = u64::from(add);
        for l in self.0.iter_mut() {
            let v = u64::from(*l) * u64::from(mul) + carry;
            *l = v as u32;
            carry = v >> 32;
        }
        if carry != 0 {
            self.0.push(carry as u32);
        }
        self.trim();
    }

    fn mul_pow10(&mut self, mut n: u64) {
        while n >= 9 {
            self.mul_add_small(1_000_000_000, 0);
            n -= 9;
        }
        self.mul_add_small(10u32.pow(n as u32), 0);
    }

    fn shl(&self, n: u64) -> Big {
        if self.is_zero() {
            return Big(Vec::new());
        }
        let (words, bits) = ((n / 32) as usize, (n % 32) as u32);
        let mut out = vec![0u32; words];
        let mut carry = 0u32;
        for &l in &self.0 {
            out.push(if bits == 0 { l } else { (l << bits) | carry });
            carry = if bits == 0 { 0 } else { l >> (32 - bits) };
        }
        out.push(carry);
        let mut b = Big(out);
        b.trim();
        b
    }

    /// `self >> n` (truncating) as a u64 (the caller knows it fits).
    fn shr_u64(&self, n: u64) -> u64 {
        let mut v = 0u64;
        for i in 0..64 {
            if self.bit(n + i) {
                v |= 1 << i;
            }
        }
        v
    }

    fn cmp(&self, o: &Big) -> Ordering {
        self.0
            .len()
            .cmp(&o.0.len())
            .then_with(|| self.0.iter().rev().cmp(o.0.iter().rev()))
    }

    fn add(&self, o: &Big) -> Big {
        let mut out = Vec::with_capacity(self.0.len().max(o.0.len()) + 1);
        let mut carry = 0u64;
        for i in 0..self.0.len().max(o.0.len()) {
            let v = u64::from(*self.0.get(i).unwrap_or(&0))
                + u64::from(*o.0.get(i).unwrap_or(&0))
                + carry;
            out.push(v as u32);
            carry = v >> 32;
        }
        out.push(carry as u32);
        let mut b = Big(out);
        b.trim();
        b
    }

    /// `self - o`; `self >= o`.
    fn sub(&self, o: &Big) -> Big {
        let mut out = Vec::with_capacity(self.0.len());
        let mut borrow = 0i64;
        for (i, &l) in self.0.iter().enumerate() {
            let mut v = i64::from(l) - i64::from(*o.0.get(i).unwrap_or(&0)) - borrow;
            borrow = 0;
            if v < 0 {
                v += 1 << 32;
                borrow = 1;
            }
            out.push(v as u32);
        }
        let mut b = Big(out);
        b.trim();
        b
    }

    /// Quotient and whether the remainder is non-zero, for quotients of
    /// at most 64 + a few bits (shift-and-subtract).
    fn div_small_quotient(&self, d: &Big) -> (Big, bool) {
        let mut rem = self.clone();
        let mut q = Big(Vec::new());
        let span = self.bits().saturating_sub(d.bits());
        for i in (0..=span).rev() {
            let t = d.shl(i);
            if rem.cmp(&t) != Ordering::Less {
                rem = rem.sub(&t);
                q = q.add(&Big::from_u64(1).shl(i));
            }
        }
        (q, !rem.is_zero())
    }

    /// Decimal digits (most significant first); "0" for zero.
    fn to_decimal(&self) -> Vec<u8> {
        let mut n = self.clone();
        let mut chunks = Vec::new();
        while !n.is_zero() {
            let mut rem = 0u64;
            for l in n.0.iter_mut().rev() {
                let v = (rem << 32) | u64::from(*l);
                *l = (v / 1_000_000_000) as u32;
                rem = v % 1_000_000_000;
            }
            n.trim();
            chunks.push(rem as u32);
        }
        let mut out = Vec::new();
        match chunks.pop() {
            None => out.push(b'0'),
            Some(top) => out.extend_from_slice(alloc::format!("{top}").as_bytes()),
        }
        for c in chunks.iter().rev() {
            out.extend_from_slice(alloc::format!("{c:09}").as_bytes());
        }
        out
    }
}

/// Rounds `(mag + sticky) * 2^exp` to the nearest extended value (ties to
/// even), where `sticky` says the exact value is a little above `mag`
/// (callers give at least two bits beyond the significand then).
fn round(neg: bool, mag: &Big, exp: i64, sticky: bool) -> LongDouble {
    if mag.is_zero() {
        return LongDouble::Zero { neg };
    }
    let len = mag.bits() as i64;
    let drop = (len - 64).max(MIN_LSB_EXP - exp);
    let (mut m, mut e) = if drop <= 0 {
        (mag.shr_u64(0), exp)
    } else {
        let d = drop as u64;
        let q = mag.shr_u64(d);
        let half = mag.bit(d - 1);
        let rest = sticky || mag.any_below(d - 1);
        if half && (rest || q & 1 == 1) {
            round_up(q, exp + drop)
        } else {
            (q, exp + drop)
        }
    };
    if m == 0 {
        return LongDouble::Zero { neg };
    }
    // Normalise small exact values so equal numbers compare equal.
    while m >> 63 == 0 && e > MIN_LSB_EXP {
        m <<= 1;
        e -= 1;
    }
    if e + 63 > MAX_TOP_EXP {
        return LongDouble::Inf { neg };
    }
    LongDouble::Finite {
        neg,
        m,
        e: e as i32,
    }
}

fn round_up(q: u64, e: i64) -> (u64, i64) {
    match q.checked_add(1) {
        Some(q) => (q, e),
        None => (1 << 63, e + 1),
    }
}

fn is_c_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

/// Digits of a mantissa: the digits (without the point) and how many
/// followed the point. At least one digit.
fn mantissa(s: &[u8], radix: u32) -> Option<(Vec<u8>, i64, usize)> {
    let mut digits = Vec::new();
    let mut frac = 0i64;
    let mut seen_point = false;
    let mut i = 0;
    while i < s.len() {
        let c = s[i];
        if c == b'.' && !seen_point {
            seen_point = true;
        } else if let Some(d) = (c as char).to_digit(radix) {
            digits.push(d as u8);
            if seen_point {
                frac += 1;
            }
        } else {
            break;
        }
        i += 1;
    }
    if digits.is_empty() {
        return None;
    }
    Some((digits, frac, i))
}

/// A signed decimal exponent, saturated far beyond any finite result.
fn exponent(s: &[u8]) -> Option<i64> {
    let (neg, digits) = match s.first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let v = digits.iter().fold(0i64, |v, &d| {
        (v * 10 + i64::from(d - b'0')).min(1_000_000_000)
    });
    Some(if neg { -v } else { v })
}

impl LongDouble {
    /// Redis's `string2ld`: `strtold` on the whole string, refusing empty
    /// or 5120+ byte strings, leading space, trailing bytes, NaN, and
    /// results that overflow to infinity or underflow to zero.
    pub fn parse(s: &[u8]) -> Option<LongDouble> {
        if s.is_empty() || s.len() >= MAX_CHARS || is_c_space(s[0]) {
            return None;
        }
        let (neg, body) = match s[0] {
            b'-' => (true, &s[1..]),
            b'+' => (false, &s[1..]),
            _ => (false, s),
        };
        if body.eq_ignore_ascii_case(b"inf") || body.eq_ignore_ascii_case(b"infinity") {
            return Some(LongDouble::Inf { neg });
        }
        let hex = body.len() > 2 && body[0] == b'0' && (body[1] | 0x20) == b'x';
        let (radix, body, exp_chars) = if hex {
            (16, &body[2..], [b'p', b'P'])
        } else {
            (10, body, [b'e', b'E'])
        };
        let (digits, frac, used) = mantissa(body, radix)?;
        let exp = match body.get(used) {
            None => 0,
            Some(c) if exp_chars.contains(c) => exponent(&body[used + 1..])?,
            Some(_) => return None,
        };
        // Significant digits only: the value is sig * radix^scale (times
        // 2^exp for hex).
        let first = digits.iter().position(|&d| d != 0);
        let Some(first) = first else {
            return Some(LongDouble::Zero { neg });
        };
        let last = digits.iter().rposition(|&d| d != 0).unwrap_or(first);
        let sig = &digits[first..=last];
        let trailing = (digits.len() - 1 - last) as i64;
        let mut mag = Big(Vec::new());
        for &d in sig {
            mag.mul_add_small(radix, u32::from(d));
        }
        let result = if hex {
            let e2 = exp + 4 * (trailing - frac);
            let top = mag.bits() as i64 + e2;
            if top > MAX_TOP_EXP + 1 {
                return None; // overflow
            }
            if top < MIN_LSB_EXP - 1 {
                return None; // underflow to zero
            }
            round(neg, &mag, e2, false)
        } else {
            let e10 = exp + trailing - frac;
            let n = sig.len() as i64;
            if n + e10 - 1 > 4933 {
                return None;
            }
            if n + e10 < -4952 {
                return None;
            }
            if e10 >= 0 {
                mag.mul_pow10(e10 as u64);
                round(neg, &mag, 0, false)
            } else {
                let mut div = Big::from_u64(1);
                div.mul_pow10((-e10) as u64);
                // Scale so the quotient has about 68 bits.
                let shift = mag.bits() as i64 - div.bits() as i64 - 68;
                let (num, den) = if shift >= 0 {
                    (mag, div.shl(shift as u64))
                } else {
                    (mag.shl((-shift) as u64), div)
                };
                let (q, inexact) = num.div_small_quotient(&den);
                round(neg, &q, shift, inexact)
            }
        };
        match result {
            LongDouble::Finite { .. } => Some(result),
            // A non-zero input that rounded to zero or infinity: ERANGE.
            _ => None,
        }
    }

    pub fn is_finite(self) -> bool {
        matches!(self, LongDouble::Zero { .. } | LongDouble::Finite { .. })
    }
}

impl core::ops::Add for LongDouble {
    type Output = LongDouble;

    /// `self + o` rounded to nearest even, as the FPU adds.
    fn add(self, o: LongDouble) -> LongDouble {
        use LongDouble::*;
        match (self, o) {
            (NaN, _) | (_, NaN) => NaN,
            (Inf { neg: a }, Inf { neg: b }) if a != b => NaN,
            (Inf { neg }, _) | (_, Inf { neg }) => Inf { neg },
            (Zero { neg: a }, Zero { neg: b }) => Zero { neg: a && b },
            (Zero { .. }, x) | (x, Zero { .. }) => x,
            (
                Finite {
                    neg: na,
                    m: ma,
                    e: ea,
                },
                Finite {
                    neg: nb,
                    m: mb,
                    e: eb,
                },
            ) => {
                let e = ea.min(eb);
                let a = Big::from_u64(ma).shl((ea - e) as u64);
                let b = Big::from_u64(mb).shl((eb - e) as u64);
                let e = i64::from(e);
                if na == nb {
                    round(na, &a.add(&b), e, false)
                } else {
                    match a.cmp(&b) {
                        Ordering::Equal => Zero { neg: false },
                        Ordering::Greater => round(na, &a.sub(&b), e, false),
                        Ordering::Less => round(nb, &b.sub(&a), e, false),
                    }
                }
            }
        }
    }
}

impl LongDouble {
    /// Redis's `ld2string(..., LD_STR_HUMAN)`: `"%.17Lf"` with trailing
    /// zeros (and a trailing point) removed, `-0` printed as `0`, and
    /// `inf`/`-inf`.
    pub fn to_human(self) -> Vec<u8> {
        let (neg, mut digits) = match self {
            LongDouble::NaN => return b"nan".to_vec(),
            LongDouble::Inf { neg } => {
                return if neg {
                    b"-inf".to_vec()
                } else {
                    b"inf".to_vec()
                }
            }
            LongDouble::Zero { neg } => (neg, b"0".to_vec()),
            LongDouble::Finite { neg, m, e } if e >= 0 => {
                let mut d = Big::from_u64(m).shl(e as u64).to_decimal();
                d.extend_from_slice(&[b'0'; 17]);
                (neg, d)
            }
            LongDouble::Finite { neg, m, e } => {
                // round(m * 10^17 / 2^k), ties to even; m * 10^17 < 2^121.
                let n = u128::from(m) * 100_000_000_000_000_000u128;
                let k = (-e) as u32;
                let q = if k >= 128 {
                    0
                } else {
                    let q = n >> k;
                    let r = n & ((1u128 << k) - 1);
                    let half = 1u128 << (k - 1);
                    if r > half || (r == half && q & 1 == 1) {
                        q + 1
                    } else {
                        q
                    }
                };
                (neg, alloc::format!("{q}").into_bytes())
            }
        };
        // digits = value * 10^17; put the point 17 places from the right.
        while digits.len() < 18 {
            digits.insert(0, b'0');
        }
        let point = digits.len() - 17;
        let mut s = Vec::with_capacity(digits.len() + 2);
        if neg {
            s.push(b'-');
        }
        s.extend_from_slice(&digits[..point]);
        s.push(b'.');
        s.extend_from_slice(&digits[point..]);
        while s.last() == Some(&b'0') {
            s.pop();
        }
        if s.last() == Some(&b'.') {
            s.pop();
        }
        if s == b"-0" {
            s = b"0".to_vec();
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::String;

    fn p(s: &str) -> LongDouble {
        LongDouble::parse(s.as_bytes()).unwrap_or_else(|| panic!("{s:?} should parse"))
    }

    fn sum(a: &str, b: &str) -> String {
        String::from_utf8((p(a) + p(b)).to_human()).unwrap()
    }

    /// Expected values computed with glibc: printf("%.17Lf", strtold(a) +
    /// strtold(b)) on x86-64, trailing zeros trimmed as Redis does.
    #[test]
    fn sums_match_glibc_long_double() {
        for (a, b, want) in [
            ("10.50", "0.1", "10.6"),
            ("10.6", "5.0e3", "5010.60000000000000009"),
            ("0.1", "0.2", "0.3"),
            ("1", "1", "2"),
            ("3.0e3", "2.0e2", "3200"),
            ("5", "-5", "0"),
            ("-0", "-0", "0"),
            ("1e-20", "0", "0"),
            ("-1e-20", "0", "0"),
            ("0x1p-3", "0", "0.125"),
            ("1.5", "-3", "-1.5"),
            ("1e18", "0.5", "1000000000000000000.5"),
            ("9223372036854775807", "1", "9223372036854775808"),
            ("0.00000000000000001", "0", "0.00000000000000001"),
            ("0.000000000000000005", "0", "0"),
            ("0.000000000000000015", "0", "0.00000000000000002"),
            ("2.5e-17", "0", "0.00000000000000002"),
            ("1e30", "1", "1000000000000000000024696061952"),
            ("123456789.123456789", "0", "123456789.12345678899873747"),
            ("3.14159265358979323846", "0", "3.14159265358979324"),
            ("0.1", "0", "0.1"),
            ("1.1", "2.2", "3.3"),
            ("100", "-0.1", "99.9"),
        ] {
            assert_eq!(sum(a, b), want, "{a} + {b}");
        }
    }

    #[test]
    fn strtold_grammar_and_range() {
        for good in [
            "1",
            "-1",
            "+1",
            ".5",
            "5.",
            "1e5",
            "1E+5",
            "1e-5",
            "0x10",
            "0X1.8p1",
            "inf",
            "-Infinity",
            "0e999999999999",
            "1e4932",
            "1e-4950",
        ] {
            assert!(LongDouble::parse(good.as_bytes()).is_some(), "{good:?}");
        }
        for bad in [
            "",
            " 1",
            "1 ",
            "abc",
            "1e",
            "1e+",
            ".",
            "nan",
            "-nan",
            "infx",
            "0x",
            "0xg",
            "1..2",
            "1e5000",
            "1e-5000",
            "0x1p99999",
            "1\0",
            "--1",
        ] {
            assert_eq!(LongDouble::parse(bad.as_bytes()), None, "{bad:?}");
        }
        assert_eq!(LongDouble::parse(&[b'1'; MAX_CHARS]), None);
    }

    #[test]
    fn extremes_round_like_the_fpu() {
        // The largest finite value, and one ulp past it overflows.
        let max = p("0x1.fffffffffffffffep16383");
        assert_eq!(
            max,
            LongDouble::Finite {
                neg: false,
                m: u64::MAX,
                e: 16383 - 63
            }
        );
        assert_eq!(max + max, LongDouble::Inf { neg: false });
        // The smallest subnormal is exact; half of it ties to zero (even).
        let tiny = p("0x1p-16445");
        assert_eq!(
            tiny,
            LongDouble::Finite {
                neg: false,
                m: 1,
                e: -16445
            }
        );
        assert_eq!(LongDouble::parse(b"0x1p-16446"), None);
        assert_eq!(tiny + tiny + p("-0x1p-16445"), tiny);
        // inf - inf is NaN; inf + x is inf.
        assert_eq!(p("inf") + p("-inf"), LongDouble::NaN);
        assert_eq!(p("inf") + p("1"), LongDouble::Inf { neg: false });
    }

    #[test]
    fn huge_values_print_every_digit() {
        let s = String::from_utf8(p("1e100").to_human()).unwrap();
        assert_eq!(s.len(), 100);
        assert!(s.starts_with("99999999999999999996693535"), "{s}");
        let max = String::from_utf8(p("0x1.fffffffffffffffep16383").to_human()).unwrap();
        assert_eq!(max.len(), 4933);
        assert!(max.starts_with("118973149535723176502"), "{max}");
    }
}
