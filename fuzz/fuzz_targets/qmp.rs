//! The management socket's input path without a daemon: bytes through the QMP framing
//! (`Splitter`), each message taken apart (`Message::from_frame`) and its command's
//! arguments read and checked (`commands::parse`): everything a client's bytes reach
//! before a command runs. No input may panic, and the frames must not depend on how the
//! bytes were cut into reads (a client may split a message anywhere).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vhost_thin::mgmt::args::Args;
use vhost_thin::mgmt::commands;
use vhost_thin::mgmt::framing::Splitter;
use vhost_thin::mgmt::message::Message;

fuzz_target!(|data: &[u8]| {
    // The first byte says how long each read is; the rest is what the client sent.
    let Some((&read_len, bytes)) = data.split_first() else {
        return;
    };
    let frames = Splitter::default().push(bytes);
    let mut split = Splitter::default();
    let mut pieces = Vec::new();
    for chunk in bytes.chunks(usize::from(read_len).max(1)) {
        pieces.extend(split.push(chunk));
    }
    assert_eq!(
        frames, pieces,
        "the frames depend on how the input was read"
    );
    for frame in frames {
        if let Ok(m) = Message::from_frame(frame) {
            let _ = commands::parse(&m.execute, Args::new(m.arguments));
        }
    }
});
