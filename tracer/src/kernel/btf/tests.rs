use super::*;

/// Builds a BTF blob: `struct outer { int a; union { int b; int c; }; int d; }`.
fn sample() -> Vec<u8> {
    let strings = b"\0int\0outer\0a\0b\0c\0d\0".to_vec();
    let s = |name: &str| {
        let pos = strings
            .windows(name.len() + 2)
            .position(|w| {
                w[0] == 0 && &w[1..=name.len()] == name.as_bytes() && w[name.len() + 1] == 0
            })
            .expect("string present");
        (pos + 1) as u32
    };
    let mut types = Vec::new();
    let mut push = |words: &[u32]| {
        for w in words {
            types.extend_from_slice(&w.to_le_bytes());
        }
    };
    // [1] int
    push(&[s("int"), KIND_INT << 24, 4, 32]);
    // [2] anonymous union { b; c; }
    push(&[0, (KIND_UNION << 24) | 2, 4]);
    push(&[s("b"), 1, 0]);
    push(&[s("c"), 1, 0]);
    // [3] struct outer { a; <union>; d @ bit 64, bitfield-encoded (kind_flag) }
    push(&[s("outer"), (1 << 31) | (KIND_STRUCT << 24) | 3, 12]);
    push(&[s("a"), 1, 0]);
    push(&[0, 2, 32]);
    push(&[s("d"), 1, (3 << 24) | 64]);
    let mut blob = Vec::new();
    for w in [
        0xeb9f_u32 | (1 << 16),
        24,
        0,
        types.len() as u32,
        types.len() as u32,
    ] {
        blob.extend_from_slice(&w.to_le_bytes());
    }
    blob.extend_from_slice(&(strings.len() as u32).to_le_bytes());
    blob.extend_from_slice(&types);
    blob.extend_from_slice(&strings);
    blob
}

#[test]
fn finds_direct_anonymous_and_bitfield_members() {
    let btf = KernelBtf::parse(&sample()).expect("parses");
    assert_eq!(btf.member_offset("outer", "a"), Ok(0));
    assert_eq!(btf.member_offset("outer", "b"), Ok(4));
    assert_eq!(btf.member_offset("outer", "c"), Ok(4));
    assert_eq!(btf.member_offset("outer", "d"), Ok(8));
    assert_eq!(
        btf.member_offset("outer", "zz"),
        Err(BtfError::NoMember("outer".into(), "zz".into()))
    );
    assert_eq!(
        btf.member_offset("nope", "a"),
        Err(BtfError::NoStruct("nope".into()))
    );
}

#[test]
fn rejects_garbage_and_truncation() {
    assert_eq!(KernelBtf::parse(b"hello").err(), Some(BtfError::BadHeader));
    let blob = sample();
    for cut in [24, 30, blob.len() - 3] {
        assert!(KernelBtf::parse(&blob[..cut]).is_err(), "cut at {cut}");
    }
}

#[test]
fn reads_this_kernels_offsets_when_btf_is_present() {
    let Ok(btf) = KernelBtf::from_sys_fs() else {
        eprintln!("skipped: {VMLINUX_BTF} not readable");
        return;
    };
    let offsets = btf.kernel_offsets().expect("all members present");
    // These have not moved in a decade; the rest is checked by the root tests.
    assert_eq!(offsets.sock_common_dport, 12);
    assert_eq!(offsets.sock_common_num, 14);
    assert_eq!(offsets.sock_common_family, 16);
    // The compiled-in defaults are this kind of machine's layout.
    if std::fs::read_to_string("/proc/sys/kernel/osrelease").is_ok_and(|r| r.starts_with("6.18")) {
        assert_eq!(offsets, KernelOffsets::DEFAULT);
    }
}
