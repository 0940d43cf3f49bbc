//! Request-body validation, the cache key and the include-usage splice, on
//! bodies a client could send. The first input byte picks the endpoint.
//!
//! Checked: no panic; validation with and without the JSON tree (cache on
//! and off) reads the same model, stream and usage flags whenever both
//! accept a body; the key does not depend on whitespace; a streaming body
//! without `stream_options` is still valid after the splice, asks for usage,
//! and parses to the client's object plus that one member.

#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use sluice::cache;
use sluice::proxy::{with_include_usage, ApiRequest};
use sluice::routes::Endpoint;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let endpoint = match pick % 3 {
        0 => Endpoint::Chat,
        1 => Endpoint::ChatPrefix,
        _ => Endpoint::Fim,
    };
    let light = ApiRequest::parse(body, endpoint, false);
    let tree = ApiRequest::parse(body, endpoint, true);
    // Whether both accept the same bodies is not checked yet: today the
    // borrowed parse refuses a repeated top-level key that the tree accepts,
    // and the tree refuses numbers out of f64's range (`1e400`) that the
    // borrowed parse accepts (issue 14, being fixed on the request-side
    // branch). Where both accept, they must read the same.
    let (Ok(light), Ok(tree)) = (light, tree) else {
        return;
    };
    assert_eq!(light.model, tree.model);
    assert_eq!(light.stream, tree.stream);
    assert_eq!(light.include_usage, tree.include_usage);
    assert_eq!(light.has_stream_options, tree.has_stream_options);
    assert!(light.value.is_none());

    let value = tree.value.as_ref().expect("the tree was asked for");
    let key = cache::key(Some("t"), endpoint.label(), value);
    // The same value, written compactly and pretty: the same key.
    let compact = serde_json::to_vec(value).expect("serializes");
    let pretty = serde_json::to_vec_pretty(value).expect("serializes");
    let reparse = |b: &[u8]| serde_json::from_slice::<Value>(b).expect("reparses");
    let (a, b) = (reparse(&compact), reparse(&pretty));
    assert_eq!(
        cache::key(Some("t"), endpoint.label(), &a),
        cache::key(Some("t"), endpoint.label(), &b)
    );
    let _ = key;

    if !light.stream {
        return;
    }
    let bytes = Bytes::copy_from_slice(body);
    let out = with_include_usage(&bytes, &light);
    // Bodies without the member (null and object cases are being reworked on
    // the request-side branch; see tests/props.rs).
    if value.get("stream_options").is_some() {
        return;
    }
    let again = ApiRequest::parse(&out, endpoint, false).expect("still a valid body");
    assert!(again.stream && again.include_usage);
    let mut want = value.clone();
    want.as_object_mut().expect("an object").insert(
        "stream_options".into(),
        serde_json::json!({"include_usage": true}),
    );
    assert_eq!(reparse(&out), want);
    assert_eq!(
        out.len(),
        body.len() + r#""stream_options":{"include_usage":true},"#.len()
    );
});
