//! gzip for scrapes: whether the client takes it, and the compression.
//!
//! Prometheus asks for gzip (`Accept-Encoding: gzip`) on every scrape. At
//! 100,000 peers the text is 54 MiB and a quarter of that compressed (the
//! peers' keys are random): every 15 s, about 29 against 7 Mbit/s to a remote
//! Prometheus. The fastest level costs about 0.08 s of CPU there, on the
//! scrape's blocking thread, never on a worker that tunnels run on.
//!
//! Left out: other encodings (Prometheus asks for none), and compressing any
//! answer but a scrape (the API's own answers are small).

use std::io::Write;

/// Whether `Accept-Encoding` values (each a header line) ask for gzip, as
/// RFC 9110 (section 12.5.3) reads them: `gzip` (or `x-gzip`), else `*`, with
/// a weight above 0 and not below the weight of `identity` (the text as it
/// is; where `identity` is not listed, `*`'s). Codings are case-insensitive; a
/// coding listed twice takes its lower weight, and a weight that is not one
/// (`q=2`, `q=abc`) counts as 0, so that nothing unreadable turns gzip on.
pub fn accepts_gzip<'a>(values: impl IntoIterator<Item = &'a str>) -> bool {
    let (mut gzip, mut identity, mut any) = (None, None, None);
    for item in values.into_iter().flat_map(|v| v.split(',')) {
        let mut parts = item.split(';');
        let coding = parts.next().unwrap_or_default().trim();
        let weight = parts.fold(1000, |w, p| w.min(weight(p)));
        let slot = if coding.eq_ignore_ascii_case("gzip") || coding.eq_ignore_ascii_case("x-gzip") {
            &mut gzip
        } else if coding.eq_ignore_ascii_case("identity") {
            &mut identity
        } else if coding == "*" {
            &mut any
        } else {
            continue;
        };
        *slot = Some(slot.map_or(weight, |w: u16| w.min(weight)));
    }
    let Some(gzip) = gzip.or(any) else {
        return false;
    };
    gzip > 0 && gzip >= identity.or(any).unwrap_or(0)
}

/// A parameter's weight in thousandths: 1000 for a parameter other than `q`;
/// for `q`, its value (`qvalue = ( "0" [ "." 0*3DIGIT ] ) / ( "1" [ "." 0*3("0") ] )`),
/// or 0 when it is not one.
fn weight(parameter: &str) -> u16 {
    let parameter = parameter.trim();
    let Some((name, value)) = parameter.split_once('=') else {
        return 1000;
    };
    if !name.eq_ignore_ascii_case("q") {
        return 1000;
    }
    let (whole, fraction) = value.split_once('.').unwrap_or((value, ""));
    let digits = fraction.len() <= 3 && fraction.bytes().all(|b| b.is_ascii_digit());
    match whole {
        "0" if digits => fraction
            .bytes()
            .chain(std::iter::repeat(b'0'))
            .take(3)
            .fold(0, |v, b| v * 10 + u16::from(b - b'0')),
        "1" if digits && fraction.bytes().all(|b| b == b'0') => 1000,
        _ => 0,
    }
}

/// `text`, gzip-compressed at the fastest level. (It writes into memory:
/// an error would be the encoder's own.)
pub fn compress(text: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut encoder = flate2::write::GzEncoder::new(
        Vec::with_capacity(text.len() / 4),
        flate2::Compression::fast(),
    );
    encoder.write_all(text)?;
    encoder.finish()
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    #[test]
    fn what_prometheus_and_others_send() {
        for (values, expected) in [
            (&["gzip"][..], true),
            (&["GZip"], true),
            (&["x-gzip"], true),
            (&["deflate, gzip;q=1.0, *;q=0.5"], true),
            (&["gzip;q=0.001"], true),
            (&["gzip;q=1"], true),
            (&["gzip ; q=0.5"], true),
            (&["identity", "gzip"], true),
            (&["*"], true),
            (&["br, *;q=0.1"], true),
            (&["*;q=0, gzip"], true),
            (&[", , gzip"], true),
            (&["gzip;q=0.5, identity;q=0.5"], true),
            (&["gzip;q=0"], false),
            (&["gzip;q=0."], false),
            (&["gzip; q=0.000"], false),
            (&["gzip ; q=0"], false),
            (&["gzip;Q=0", "*"], false),
            (&["gzip, gzip;q=0"], false),
            (&["gzip;q=0, gzip"], false),
            (&["*;q=0"], false),
            (&["gzip;q=0.1, identity"], false),
            (&["*;q=0.1, identity"], false),
            (&["gzip;q=2"], false),
            (&["gzip;q=abc"], false),
            (&["gzip;q=0.0001"], false),
            (&["gzip;q=1.5"], false),
            (&["identity"], false),
            (&["identity;q=0"], false),
            (&["br, deflate"], false),
            (&[""], false),
            (&[], false),
        ] {
            assert_eq!(accepts_gzip(values.iter().copied()), expected, "{values:?}");
        }
    }

    #[test]
    fn compressed_text_reads_back() {
        let text: String = (0..10_000)
            .map(|n| format!("wgplane_x{{n=\"{n}\"}} {n}\n"))
            .collect();
        let compressed = compress(text.as_bytes()).unwrap();
        assert!(compressed.len() < text.len() / 4);
        let mut back = String::new();
        flate2::read::GzDecoder::new(&compressed[..])
            .read_to_string(&mut back)
            .unwrap();
        assert_eq!(back, text);
    }
}
