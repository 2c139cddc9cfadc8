use super::*;

const CLEAN: &str = include_str!("../../../tests/fixtures/xml/dm-thin-kernel-clean.thin_dump.xml");
const HELD_SNAP: &str = include_str!(
    "../../../tests/fixtures/xml/dm-thin-kernel-held-snap.thin_dump-metadata-snap.xml"
);

fn sb() -> DumpSuperblock {
    DumpSuperblock {
        uuid: String::new(),
        time: 1,
        transaction: 2,
        flags: 0,
        version: 2,
        data_block_size: 128,
        nr_data_blocks: 1024,
    }
}

fn dev(dev_id: u32) -> DumpDevice {
    DumpDevice {
        dev_id,
        mapped_blocks: 0,
        transaction: 0,
        creation_time: 0,
        snap_time: 0,
    }
}

fn m(vblock: u64, data_block: u64, time: u32) -> DumpMapping {
    DumpMapping {
        vblock,
        data_block,
        time,
    }
}

/// Writes one device with the given mappings and returns only the mapping
/// lines.
fn write_mappings(maps: &[DumpMapping]) -> Vec<String> {
    let mut w = XmlWriter::new(Vec::new());
    w.begin_superblock(&sb()).unwrap();
    w.begin_device(&dev(0)).unwrap();
    for &x in maps {
        w.mapping(x).unwrap();
    }
    w.end_device().unwrap();
    w.end_superblock().unwrap();
    let s = String::from_utf8(w.into_inner()).unwrap();
    s.lines()
        .filter(|l| l.starts_with("    <"))
        .map(|l| l.trim().to_string())
        .collect()
}

fn err(input: &str) -> XmlError {
    match parse(input) {
        Ok(d) => panic!("expected an error, parsed {d:?}"),
        Err(e) => e,
    }
}

const HEAD: &str = "<superblock uuid=\"\" time=\"1\" transaction=\"2\" flags=\"0\" version=\"2\" data_block_size=\"128\" nr_data_blocks=\"1024\">\n  <device dev_id=\"0\" mapped_blocks=\"3\" transaction=\"0\" creation_time=\"0\" snap_time=\"0\">\n";
const TAIL: &str = "  </device>\n</superblock>\n";

/// A document whose mapping lines start on line 3.
fn doc(mappings: &str) -> String {
    format!("{HEAD}{mappings}{TAIL}")
}

#[test]
fn round_trip_clean_fixture() {
    let d = parse(CLEAN).unwrap();
    assert_eq!(d.to_xml_string().unwrap(), CLEAN);
}

#[test]
fn round_trip_held_snap_fixture() {
    let d = parse(HELD_SNAP).unwrap();
    assert_eq!(d.to_xml_string().unwrap(), HELD_SNAP);
}

#[test]
fn round_trip_per_block_through_writer() {
    for fixture in [CLEAN, HELD_SNAP] {
        let d = parse(fixture).unwrap();
        let mut w = XmlWriter::new(Vec::new());
        w.begin_superblock(&d.superblock).unwrap();
        for dev in &d.devices {
            w.begin_device(&dev.device).unwrap();
            for x in dev.mappings() {
                w.mapping(x).unwrap();
            }
            w.end_device().unwrap();
        }
        w.end_superblock().unwrap();
        assert_eq!(String::from_utf8(w.into_inner()).unwrap(), fixture);
    }
}

#[test]
fn clean_fixture_contents() {
    let d = parse(CLEAN).unwrap();
    assert_eq!(
        d.superblock,
        DumpSuperblock {
            uuid: String::new(),
            time: 3,
            transaction: 42,
            flags: 0,
            version: 2,
            data_block_size: 128,
            nr_data_blocks: 1024,
        }
    );
    assert_eq!(d.devices.len(), 4);
    let d0 = &d.devices[0];
    assert_eq!(
        d0.device,
        DumpDevice {
            dev_id: 0,
            mapped_blocks: 10,
            transaction: 0,
            creation_time: 0,
            snap_time: 3,
        }
    );
    assert_eq!(
        d0.runs[3],
        DumpRun {
            vbegin: 160,
            data_begin: 5,
            length: 3,
            time: 0
        }
    );
    for dev in &d.devices {
        assert_eq!(dev.block_count(), dev.device.mapped_blocks);
        assert_eq!(dev.mappings().count() as u64, dev.device.mapped_blocks);
    }
    let m1: Vec<_> = d.devices[1].mappings().take(3).collect();
    assert_eq!(m1, vec![m(0, 13, 1), m(1, 1, 0), m(2, 2, 0)]);
}

#[test]
fn writer_single_and_range() {
    assert_eq!(
        write_mappings(&[m(5, 9, 1)]),
        vec![r#"<single_mapping origin_block="5" data_block="9" time="1"/>"#]
    );
    // A run of length 2 is already a range.
    assert_eq!(
        write_mappings(&[m(5, 9, 1), m(6, 10, 1)]),
        vec![r#"<range_mapping origin_begin="5" data_begin="9" length="2" time="1"/>"#]
    );
    assert_eq!(
        write_mappings(&[m(0, 0, 0), m(1, 1, 0), m(2, 2, 0), m(3, 3, 0)]),
        vec![r#"<range_mapping origin_begin="0" data_begin="0" length="4" time="0"/>"#]
    );
}

#[test]
fn writer_time_change_breaks_run() {
    assert_eq!(
        write_mappings(&[m(0, 0, 0), m(1, 1, 0), m(2, 2, 1), m(3, 3, 1)]),
        vec![
            r#"<range_mapping origin_begin="0" data_begin="0" length="2" time="0"/>"#,
            r#"<range_mapping origin_begin="2" data_begin="2" length="2" time="1"/>"#,
        ]
    );
    assert_eq!(
        write_mappings(&[m(0, 0, 0), m(1, 1, 1)]),
        vec![
            r#"<single_mapping origin_block="0" data_block="0" time="0"/>"#,
            r#"<single_mapping origin_block="1" data_block="1" time="1"/>"#,
        ]
    );
}

#[test]
fn writer_discontinuity_breaks_run() {
    // Data discontinuity.
    assert_eq!(
        write_mappings(&[m(0, 10, 0), m(1, 11, 0), m(2, 5, 0), m(3, 6, 0), m(4, 7, 0)]),
        vec![
            r#"<range_mapping origin_begin="0" data_begin="10" length="2" time="0"/>"#,
            r#"<range_mapping origin_begin="2" data_begin="5" length="3" time="0"/>"#,
        ]
    );
    // Data going backwards by one is not a continuation.
    assert_eq!(
        write_mappings(&[m(0, 10, 0), m(1, 9, 0)]),
        vec![
            r#"<single_mapping origin_block="0" data_block="10" time="0"/>"#,
            r#"<single_mapping origin_block="1" data_block="9" time="0"/>"#,
        ]
    );
    // Virtual discontinuity with contiguous data.
    assert_eq!(
        write_mappings(&[m(0, 0, 0), m(2, 1, 0), m(3, 2, 0)]),
        vec![
            r#"<single_mapping origin_block="0" data_block="0" time="0"/>"#,
            r#"<range_mapping origin_begin="2" data_begin="1" length="2" time="0"/>"#,
        ]
    );
}

#[test]
fn writer_extreme_blocks() {
    assert_eq!(
        write_mappings(&[m(u64::MAX - 1, u64::MAX - 1, 7), m(u64::MAX, u64::MAX, 7)]),
        vec![format!(
            r#"<range_mapping origin_begin="{}" data_begin="{}" length="2" time="7"/>"#,
            u64::MAX - 1,
            u64::MAX - 1
        )]
    );
}

#[test]
fn writer_rejects_misuse() {
    let mut w = XmlWriter::new(Vec::new());
    assert!(w.begin_device(&dev(0)).is_err());
    assert!(w.mapping(m(0, 0, 0)).is_err());
    w.begin_superblock(&sb()).unwrap();
    assert!(w.begin_superblock(&sb()).is_err());
    assert!(w.end_device().is_err());
    w.begin_device(&dev(0)).unwrap();
    w.mapping(m(5, 0, 0)).unwrap();
    let e = w.mapping(m(5, 1, 0)).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    assert!(w.mapping(m(4, 1, 0)).is_err());
    assert!(w
        .run(DumpRun {
            vbegin: 10,
            data_begin: 0,
            length: 0,
            time: 0
        })
        .is_err());
    assert!(w.end_superblock().is_err());
    w.end_device().unwrap();
    w.end_superblock().unwrap();
    assert!(w.begin_device(&dev(1)).is_err());
}

#[test]
fn writer_empty_device_and_uuid_escaping() {
    let mut w = XmlWriter::new(Vec::new());
    let mut s = sb();
    s.uuid = "a\"b&c<d>e'f".to_string();
    w.begin_superblock(&s).unwrap();
    w.begin_device(&dev(3)).unwrap();
    w.end_device().unwrap();
    w.end_superblock().unwrap();
    let out = String::from_utf8(w.into_inner()).unwrap();
    assert_eq!(
        out,
        "<superblock uuid=\"a&quot;b&amp;c&lt;d&gt;e&apos;f\" time=\"1\" transaction=\"2\" flags=\"0\" version=\"2\" data_block_size=\"128\" nr_data_blocks=\"1024\">\n  <device dev_id=\"3\" mapped_blocks=\"0\" transaction=\"0\" creation_time=\"0\" snap_time=\"0\">\n  </device>\n</superblock>\n"
    );
    let d = parse(&out).unwrap();
    assert_eq!(d.superblock.uuid, s.uuid);
    assert_eq!(d.devices.len(), 1);
    assert!(d.devices[0].runs.is_empty());
    assert_eq!(d.to_xml_string().unwrap(), out);
}

#[test]
fn parse_is_lenient_about_layout() {
    let input = "\u{feff}<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<!-- a comment -->\n\
        <superblock nr_data_blocks='5' metadata_snap=\"77\" data_block_size=\"128\" version=\"2\"\n   flags=\"0\" transaction=\"9\" time=\"4\" uuid=\"x&#65;&#x42;&lt;\" >\n\
        <!-- multi\nline -->\n\
        <device snap_time=\"1\" creation_time=\"1\" transaction=\"0\" mapped_blocks=\"0\" dev_id=\"7\"/>\n\
        <device dev_id=\"8\" mapped_blocks=\"3\" transaction=\"0\" creation_time=\"0\" snap_time=\"0\"></device>\n\
        <device dev_id=\"9\" mapped_blocks=\"3\" transaction=\"0\" creation_time=\"0\" snap_time=\"0\">\n\
        \t<single_mapping time=\"0\" data_block=\"4\" origin_block=\"0\"></single_mapping>\n\
        <range_mapping origin_begin=\"1\" data_begin=\"5\" length=\"2\" time=\"0\" />\n\
        </device >\n</superblock>\n<!-- trailing -->\n";
    let d = parse(input).unwrap();
    assert_eq!(d.superblock.uuid, "xAB<");
    assert_eq!(d.superblock.time, 4);
    assert_eq!(d.superblock.transaction, 9);
    assert_eq!(d.superblock.nr_data_blocks, 5);
    assert_eq!(d.devices.len(), 3);
    assert!(d.devices[0].runs.is_empty());
    assert!(d.devices[1].runs.is_empty());
    assert_eq!(d.devices[2].device.dev_id, 9);
    // Adjacent contiguous runs are merged on output.
    let out = d.to_xml_string().unwrap();
    assert!(out.contains(
        "    <range_mapping origin_begin=\"0\" data_begin=\"4\" length=\"3\" time=\"0\"/>\n"
    ));
    assert!(!out.contains("metadata_snap"));
}

#[test]
fn empty_superblock() {
    let d = parse("<superblock uuid=\"\" time=\"0\" transaction=\"0\" flags=\"0\" version=\"2\" data_block_size=\"128\" nr_data_blocks=\"0\"/>").unwrap();
    assert!(d.devices.is_empty());
    assert_eq!(
        d.to_xml_string().unwrap(),
        "<superblock uuid=\"\" time=\"0\" transaction=\"0\" flags=\"0\" version=\"2\" data_block_size=\"128\" nr_data_blocks=\"0\">\n</superblock>\n"
    );
}

#[test]
fn error_missing_attribute() {
    let e = err(&doc(
        "    <single_mapping origin_block=\"0\" time=\"0\"/>\n",
    ));
    assert_eq!(
        e.to_string(),
        "line 3: <single_mapping> is missing attribute \"data_block\""
    );
    assert_eq!(e.line(), 3);
    let e = err(&HEAD.replace(" flags=\"0\"", ""));
    assert_eq!(
        e.to_string(),
        "line 1: <superblock> is missing attribute \"flags\""
    );
}

#[test]
fn error_unknown_element_and_attribute() {
    let e = err(&doc("    <zero_mapping origin_block=\"0\"/>\n"));
    assert!(matches!(e, XmlError::UnknownElement { line: 3, .. }), "{e}");
    assert!(e
        .to_string()
        .starts_with("line 3: unknown element <zero_mapping>; expected"));
    let e = err(&doc(
        "    <single_mapping origin_block=\"0\" data_block=\"0\" time=\"0\" colour=\"red\"/>\n",
    ));
    assert!(
        matches!(e, XmlError::UnknownAttribute { line: 3, .. }),
        "{e}"
    );
    let e = err(&doc(
        "    <single_mapping origin_block=\"0\" data_block=\"0\" time=\"0\" time=\"0\"/>\n",
    ));
    assert!(
        matches!(e, XmlError::DuplicateAttribute { line: 3, .. }),
        "{e}"
    );
}

#[test]
fn error_bad_numbers() {
    for bad in [
        "",
        "-1",
        "+1",
        "1.0",
        "0x10",
        "12a",
        " 1",
        "18446744073709551616",
    ] {
        let e = err(&doc(&format!(
            "    <single_mapping origin_block=\"{bad}\" data_block=\"0\" time=\"0\"/>\n"
        )));
        assert!(
            matches!(
                e,
                XmlError::BadNumber {
                    line: 3,
                    attr: "origin_block",
                    bits: 64,
                    ..
                }
            ),
            "{bad:?}: {e}"
        );
    }
    let e = err(&doc(
        "    <single_mapping origin_block=\"0\" data_block=\"0\" time=\"4294967296\"/>\n",
    ));
    assert!(
        matches!(
            e,
            XmlError::BadNumber {
                line: 3,
                bits: 32,
                ..
            }
        ),
        "{e}"
    );
    assert!(e
        .to_string()
        .contains("expected an unsigned decimal integer"));
    // Largest values are fine.
    let d = parse(&doc(
        "    <single_mapping origin_block=\"18446744073709551615\" data_block=\"18446744073709551615\" time=\"4294967295\"/>\n",
    ))
    .unwrap();
    assert_eq!(
        d.devices[0].runs[0],
        DumpRun {
            vbegin: u64::MAX,
            data_begin: u64::MAX,
            length: 1,
            time: u32::MAX
        }
    );
}

#[test]
fn error_unterminated() {
    let e = err(&doc(
        "    <single_mapping origin_block=\"0\" data_block=\"0\" time=\"0\"\n",
    ));
    // The next tag starts before this one is closed.
    assert_eq!(
        e.to_string(),
        "line 3: unterminated tag <single_mapping; expected '>' or \"/>\" before the next '<'"
    );
    let e = err(&format!("{HEAD}    <single_mapping origin_block=\"0\""));
    assert!(matches!(e, XmlError::Unterminated { line: 3, .. }), "{e}");
    assert!(e
        .to_string()
        .starts_with("line 3: unterminated tag <single_mapping"));
    let e = err(&format!("{HEAD}    <single_mapping origin_block=\"0"));
    assert!(matches!(e, XmlError::Unterminated { line: 3, .. }), "{e}");
    let e = err(&format!("{HEAD}  <!-- never closed\n\n"));
    assert!(matches!(e, XmlError::Unterminated { line: 3, .. }), "{e}");
    let e = err(HEAD);
    assert!(matches!(e, XmlError::UnexpectedEof { line: 3, .. }), "{e}");
    assert_eq!(
        e.to_string(),
        "line 3: unexpected end of input; expected a mapping or </device>"
    );
    let e = err("");
    assert!(matches!(e, XmlError::UnexpectedEof { line: 1, .. }), "{e}");
}

#[test]
fn error_misplaced_elements() {
    let e = err("<superblock uuid=\"\" time=\"1\" transaction=\"2\" flags=\"0\" version=\"2\" data_block_size=\"128\" nr_data_blocks=\"1024\">\n  <single_mapping origin_block=\"0\" data_block=\"0\" time=\"0\"/>\n</superblock>\n");
    assert_eq!(
        e.to_string(),
        "line 2: <single_mapping> is not allowed outside a <device>; expected <device> or </superblock>"
    );
    let e = err("\n<device dev_id=\"0\" mapped_blocks=\"0\" transaction=\"0\" creation_time=\"0\" snap_time=\"0\">\n</device>\n");
    assert_eq!(
        e.to_string(),
        "line 2: <device> is not allowed outside a <superblock>; expected <superblock>"
    );
    let e = err(&doc("    <device dev_id=\"1\" mapped_blocks=\"0\" transaction=\"0\" creation_time=\"0\" snap_time=\"0\"/>\n"));
    assert!(matches!(e, XmlError::Misplaced { line: 3, .. }), "{e}");
    let e = err(&format!("{}{}", doc(""), "<superblock/>\n"));
    assert!(matches!(e, XmlError::Misplaced { line: 5, .. }), "{e}");
    let e = err(&doc("  </superblock>\n"));
    assert!(
        matches!(e, XmlError::UnexpectedClose { line: 3, .. }),
        "{e}"
    );
    let e = err(&doc("    hello\n"));
    assert!(matches!(e, XmlError::UnexpectedText { line: 3, .. }), "{e}");
    let e = err(&doc(
        "    <single_mapping origin_block=\"0\" data_block=\"0\" time=\"0\">\n  </device>\n",
    ));
    assert!(
        matches!(e, XmlError::UnexpectedClose { line: 4, .. }),
        "{e}"
    );
}

#[test]
fn error_shared_subtrees() {
    let e = err(&doc("    <ref name=\"5\"/>\n"));
    assert_eq!(
        e.to_string(),
        "line 3: shared subtree <def>/<ref> elements (thin-provisioning-tools 1.x) are not supported"
    );
    let e = err("<superblock uuid=\"\" time=\"1\" transaction=\"2\" flags=\"0\" version=\"2\" data_block_size=\"128\" nr_data_blocks=\"1024\">\n  <def name=\"5\">\n  </def>\n</superblock>\n");
    assert!(matches!(e, XmlError::SharedSubtree { line: 2 }), "{e}");
}

#[test]
fn error_ordering() {
    let e = err(&doc(
        "    <single_mapping origin_block=\"5\" data_block=\"0\" time=\"0\"/>\n    <single_mapping origin_block=\"4\" data_block=\"1\" time=\"0\"/>\n",
    ));
    assert!(
        matches!(
            e,
            XmlError::Descending {
                line: 4,
                vbegin: 4,
                prev_vbegin: 5
            }
        ),
        "{e}"
    );
    let e = err(&doc(
        "    <range_mapping origin_begin=\"5\" data_begin=\"0\" length=\"3\" time=\"0\"/>\n    <single_mapping origin_block=\"7\" data_block=\"1\" time=\"0\"/>\n",
    ));
    assert!(
        matches!(
            e,
            XmlError::Overlap {
                line: 4,
                vbegin: 7,
                prev_last: 7
            }
        ),
        "{e}"
    );
    let e = err(&doc(
        "    <single_mapping origin_block=\"5\" data_block=\"0\" time=\"0\"/>\n    <single_mapping origin_block=\"5\" data_block=\"1\" time=\"0\"/>\n",
    ));
    assert!(matches!(e, XmlError::Overlap { line: 4, .. }), "{e}");
    // Adjacent is fine, and ordering is per device.
    parse(&doc(
        "    <range_mapping origin_begin=\"5\" data_begin=\"0\" length=\"3\" time=\"0\"/>\n    <single_mapping origin_block=\"8\" data_block=\"1\" time=\"0\"/>\n  </device>\n  <device dev_id=\"1\" mapped_blocks=\"1\" transaction=\"0\" creation_time=\"0\" snap_time=\"0\">\n    <single_mapping origin_block=\"0\" data_block=\"1\" time=\"0\"/>\n",
    ))
    .unwrap();
    let e = err(&doc(
        "  </device>\n  <device dev_id=\"0\" mapped_blocks=\"0\" transaction=\"0\" creation_time=\"0\" snap_time=\"0\">\n",
    ));
    assert!(
        matches!(e, XmlError::DuplicateDevice { line: 4, dev_id: 0 }),
        "{e}"
    );
}

#[test]
fn error_zero_length_and_overflow() {
    let e = err(&doc(
        "    <range_mapping origin_begin=\"5\" data_begin=\"0\" length=\"0\" time=\"0\"/>\n",
    ));
    assert_eq!(
        e.to_string(),
        "line 3: <range_mapping> has length 0; expected a length of at least 1"
    );
    let e = err(&doc(
        "    <range_mapping origin_begin=\"0\" data_begin=\"18446744073709551615\" length=\"2\" time=\"0\"/>\n",
    ));
    assert!(
        matches!(
            e,
            XmlError::Overflow {
                line: 3,
                what: "data",
                ..
            }
        ),
        "{e}"
    );
    let e = err(&doc(
        "    <range_mapping origin_begin=\"18446744073709551614\" data_begin=\"0\" length=\"3\" time=\"0\"/>\n",
    ));
    assert!(
        matches!(
            e,
            XmlError::Overflow {
                line: 3,
                what: "virtual",
                ..
            }
        ),
        "{e}"
    );
    // Exactly reaching the last block is fine.
    parse(&doc(
        "    <range_mapping origin_begin=\"18446744073709551614\" data_begin=\"18446744073709551614\" length=\"2\" time=\"0\"/>\n",
    ))
    .unwrap();
}

#[test]
fn error_bad_entity() {
    for uuid in ["&bogus;", "&amp", "&#xZZ;", "&#55296;", "&#;", "&#x110000;"] {
        let e = err(&HEAD.replace("uuid=\"\"", &format!("uuid=\"{uuid}\"")));
        assert!(
            matches!(e, XmlError::BadEntity { line: 1, .. }),
            "{uuid}: {e}"
        );
    }
}

/// Deterministic xorshift64* PRNG.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

#[test]
fn parse_never_panics() {
    const TOKENS: &[&str] = &[
        "<",
        ">",
        "/>",
        "</",
        "\"",
        "'",
        "=",
        "&",
        "&amp;",
        "&#x",
        ";",
        "<!--",
        "-->",
        "<?",
        "?>",
        "<!",
        "\n",
        " ",
        "0",
        "18446744073709551615",
        "99999999999999999999999",
        "4294967296",
        "<def name=\"1\"/>",
        "<ref name=\"1\"/>",
        "</device>",
        "</superblock>",
        "<device dev_id=\"0\">",
        "<single_mapping origin_block=\"0\" data_block=\"0\" time=\"0\"/>",
        "length=\"0\"",
        "\u{e9}",
        "\u{1f600}",
        "\u{feff}",
    ];
    // Every prefix, at every char boundary.
    for fixture in [CLEAN, HELD_SNAP] {
        for n in 0..=fixture.len() {
            if let Some(prefix) = fixture.get(..n) {
                let r = parse(prefix);
                if n < fixture.len() - 1 {
                    assert!(r.is_err(), "prefix of {n} bytes parsed");
                }
            }
        }
    }
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for iter in 0..4000 {
        let base = if iter % 2 == 0 { CLEAN } else { HELD_SNAP };
        let mut bytes = base.as_bytes().to_vec();
        let edits = 1 + rng.below(8);
        for _ in 0..edits {
            let pos = rng.below(bytes.len() + 1);
            match rng.below(5) {
                0 => {
                    if let Some(b) = bytes.get_mut(pos) {
                        *b = rng.next() as u8;
                    }
                }
                1 => {
                    if pos < bytes.len() {
                        bytes.remove(pos);
                    }
                }
                2 => {
                    let end = (pos + rng.below(64)).min(bytes.len());
                    bytes.drain(pos.min(end)..end);
                }
                3 => {
                    let tok = TOKENS[rng.below(TOKENS.len())].as_bytes();
                    bytes.splice(pos..pos, tok.iter().copied());
                }
                _ => {
                    if let Some(b) = bytes.get_mut(pos) {
                        *b ^= 1 << rng.below(8);
                    }
                }
            }
        }
        let text = String::from_utf8_lossy(&bytes);
        match parse(&text) {
            Ok(d) => {
                // Whatever parses must serialise, and the output must parse
                // back to the same model (modulo merging of adjacent runs)
                // and serialise identically.
                let out = d.to_xml_string().unwrap();
                let again = parse(&out).unwrap();
                assert_eq!(again.superblock, d.superblock);
                assert_eq!(again.devices.len(), d.devices.len());
                for (a, b) in again.devices.iter().zip(&d.devices) {
                    assert_eq!(a.device, b.device);
                    assert_eq!(a.block_count(), b.block_count());
                }
                assert_eq!(again.to_xml_string().unwrap(), out);
            }
            Err(e) => {
                assert!(e.line() >= 1);
                assert!(e.to_string().starts_with("line "));
            }
        }
    }
}
