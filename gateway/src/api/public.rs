//! What the API shows of the read models' rows.

/// A job or slide view as a tenant gets it: without the read model's `position`, which is the
/// log's global position: its steps would show the volume of every other tenant's work
/// (ADR 0020). Live updates resume from opaque cursors instead.
pub fn public_view<T: serde::Serialize>(view: &T) -> serde_json::Value {
    let mut v = serde_json::to_value(view).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        o.remove("position");
    }
    v
}
