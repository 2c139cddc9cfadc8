//! The configuration file's path from bytes to a validated `Config`: `vmm_config::parse`,
//! which `vmm_config::load` calls on the file's text (the daemon's `serve --config` and
//! `config check`). No input may panic, an error must render, and what is accepted must hold
//! the promises the daemon relies on without checking again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm_config::limits;

const BREAKS: [char; 5] = ['\r', '\n', '\u{85}', '\u{2028}', '\u{2029}'];

/// The last line an error can be reported on, as YAML 1.1 (libyaml, under serde_norway)
/// counts lines: CR, LF, CRLF, NEL, LS and PS each end one, and the text after the last break
/// is a line too, even empty. libyaml puts the end of a text that does not end in a break on
/// a line of its own (the line after the last), where "unexpected end" errors point.
fn last_line(text: &str) -> usize {
    let breaks = text.matches(BREAKS).count() - text.matches("\r\n").count();
    1 + breaks + usize::from(!text.ends_with(BREAKS))
}

fuzz_target!(|data: &[u8]| {
    // `load` reads the file with `read_to_string`, which refuses what is not UTF-8 before
    // parsing: such input never reaches the parser.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let cfg = match vmm_config::parse(text, "fuzz.yaml") {
        Ok(cfg) => cfg,
        Err(e) => {
            // Every error is printed for the operator; its location must be in the file.
            let _ = e.to_string();
            if let Some(line) = e.line {
                let last = last_line(text);
                assert!(line <= last, "line {line}, the last is {last}: {e}");
            }
            return;
        }
    };
    for p in &cfg.pools {
        assert!(limits::check_name(&p.name).is_ok(), "pool {:?}", p.name);
        let bs = p.block_size.0;
        assert!(bs % (64 << 10) == 0 && ((64 << 10)..=(1 << 30)).contains(&bs));
        assert!(p.low_water.data <= 100 && p.low_water.metadata <= 100);
        assert!(limits::check_queue_timeout(p.out_of_space.timeout).is_ok());
    }
    for d in &cfg.disks {
        assert!(limits::check_name(&d.name).is_ok(), "disk {:?}", d.name);
        assert_eq!(
            limits::disk_size_problem(d.size.0),
            None,
            "disk {:?}",
            d.name
        );
        assert!(limits::num_queues_ok(d.num_queues as usize));
        assert!(limits::queue_size_ok(d.queue_size as usize));
        // A disk names a pool that exists, or there is exactly one to take.
        match &d.pool {
            Some(p) => assert!(cfg.pools.iter().any(|q| &q.name == p)),
            None => assert_eq!(cfg.pools.len(), 1),
        }
        if let Some(s) = &d.serial {
            assert!(s.len() <= 20 && s.is_ascii());
        }
        if let Some(c) = &d.clone_from {
            assert!(limits::check_name(c).is_ok() && c != &d.name);
        }
    }
    if let Some(m) = &cfg.management {
        assert!(u32::from_str_radix(&m.mode, 8).is_ok_and(|v| v <= 0o777));
    }
});
