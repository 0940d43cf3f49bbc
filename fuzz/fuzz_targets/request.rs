//! Request-body validation, the cache key and the include-usage splice, on
//! bodies a client could send. The first input byte picks the endpoint.
//!
//! Checked: no panic; validation with and without the cache key (cache on
//! and off) accepts the same bodies and reads the same model, stream and
//! usage flags; the key does not depend on whitespace (the same value
//! written compactly and pretty); a streaming body is still valid after the
//! splice and asks for usage.

#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use sluice::request::validate::{with_include_usage, ApiRequest, Keyed};
use sluice::api::{Endpoint, Format};

fuzz_target!(|data: &[u8]| {
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let endpoint = match pick % 4 {
        0 => Endpoint::Chat,
        1 => Endpoint::ChatPrefix,
        2 => Endpoint::Fim,
        _ => Endpoint::Messages,
    };
    let light = ApiRequest::parse(body, endpoint, Keyed::No);
    let keyed = ApiRequest::parse(body, endpoint, Keyed::In(Some("t")));
    // The cache mode never changes what is accepted (docs/api.md, "Request bodies").
    assert_eq!(light.is_ok(), keyed.is_ok());
    let (Ok(light), Ok(keyed)) = (light, keyed) else {
        return;
    };
    assert_eq!(light.model, keyed.model);
    assert_eq!(light.stream, keyed.stream);
    assert_eq!(light.include_usage, keyed.include_usage);
    assert!(light.key.is_none() && keyed.key.is_some());

    // The same value written compactly and pretty: the same key, when
    // serde_json reads it as the same value (it keeps the last of a
    // repeated nested key, which the key's canonical form keeps too).
    if let Ok(value) = serde_json::from_slice::<Value>(body) {
        let compact = serde_json::to_vec(&value).expect("serializes");
        let pretty = serde_json::to_vec_pretty(&value).expect("serializes");
        let k = |b: &[u8]| {
            ApiRequest::parse(b, endpoint, Keyed::In(Some("t")))
                .ok()
                .and_then(|a| a.key)
        };
        assert_eq!(k(&compact), k(&pretty));
    }

    if !light.stream {
        return;
    }
    let bytes = Bytes::copy_from_slice(body);
    let out = with_include_usage(&bytes, &light);
    if endpoint.format() == Format::Anthropic {
        // Anthropic's streams carry usage unasked: the bytes go as sent.
        assert_eq!(out, bytes);
        return;
    }
    let again = ApiRequest::parse(&out, endpoint, Keyed::No).expect("still a valid body");
    assert!(again.stream && again.include_usage);
});
