//! Loader memory follows the bytes actually present, not what a header claims or how it is
//! encoded (issue 13): the peak resident memory (Linux's VmHWM) is measured while a hostile file
//! is parsed. One test function, so nothing else allocates in this binary meanwhile.

use kiln::formats::gguf::Gguf;
use kiln::formats::safetensors::SafeTensors;
use kiln_tests::surgery::{gguf_file, Meta};

/// A field of /proc/self/status in bytes (VmRSS: resident now, VmHWM: peak resident).
fn status(field: &str) -> usize {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s
        .lines()
        .find(|l| l.starts_with(field))
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"));
    let kb: usize = line[field.len() + 1..]
        .trim()
        .trim_end_matches(" kB")
        .trim()
        .parse()
        .unwrap();
    kb << 10
}

/// Peak resident bytes while `f` runs beyond those resident before it (Linux resets the peak
/// when 5 is written to clear_refs).
fn peak_extra<T>(f: impl FnOnce() -> T) -> (T, usize) {
    std::fs::write("/proc/self/clear_refs", "5").expect("resetting the peak RSS");
    let before = status("VmRSS");
    let t = f();
    (t, status("VmHWM").saturating_sub(before))
}

#[test]
fn parsing_memory_follows_the_bytes_present() {
    const MB: usize = 1 << 20;
    // A GGUF whose metadata holds a 64 M-element u8 array (as a 260 M one in the issue): each
    // element used to become a 32-byte value (2 GB here); now the array is its own bytes.
    let n = 64 * MB;
    let file = gguf_file(&[("junk", Meta::Bytes(n, 7))], &[], &[]);
    let len = file.len();
    let (g, extra) = peak_extra(|| Gguf::parse("junk.gguf", file).unwrap());
    let a = g.get("junk").unwrap().as_array().unwrap();
    assert_eq!(
        (a.len(), a.get(n - 1).and_then(|v| v.as_u64())),
        (n, Some(7))
    );
    eprintln!(
        "GGUF with a {n}-element u8 array ({len} bytes): parse peak +{} MB",
        extra / MB
    );
    assert!(
        extra < len + 4 * MB,
        "{extra} bytes allocated for a {len}-byte file"
    );
    drop(g);
    // The same for a string array: one buffer of text and one end offset per string.
    let strs: Vec<String> = (0..2_000_000).map(|i| format!("t{}", i % 1000)).collect();
    let refs: Vec<&str> = strs.iter().map(String::as_str).collect();
    let file = gguf_file(&[("tokens", Meta::Strs(&refs))], &[], &[]);
    let len = file.len();
    let (g, extra) = peak_extra(|| Gguf::parse("tokens.gguf", file).unwrap());
    let a = g.get("tokens").unwrap().as_array().unwrap();
    assert_eq!(a.str(1_999_999), Some("t999"));
    eprintln!(
        "GGUF with 2 M strings ({len} bytes): parse peak +{} MB",
        extra / MB
    );
    assert!(
        extra < 2 * len,
        "{extra} bytes allocated for a {len}-byte file"
    );
    drop(g);
    // A safetensors header that is mostly a long `__metadata__` list (the issue's 300 MB one
    // peaked at 4.5 GB): the list is skipped without being built.
    let list = "0,".repeat(16 * MB);
    let json = format!(
        r#"{{"__metadata__": [{list}0], "w": {{"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}}}"#
    );
    let mut file = (json.len() as u64).to_le_bytes().to_vec();
    file.extend(json.as_bytes());
    file.extend([0u8; 8]);
    let len = file.len();
    drop((list, json));
    let (st, extra) = peak_extra(|| {
        let mut st = SafeTensors::new();
        st.add_file("meta.safetensors", file).unwrap();
        st
    });
    assert_eq!(st.len(), 1);
    eprintln!(
        "safetensors with a {len}-byte header: parse peak +{} KB",
        extra >> 10
    );
    assert!(
        extra < MB,
        "{extra} bytes allocated beyond the {len}-byte file"
    );
}
