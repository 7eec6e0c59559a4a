//! The OpenAPI schemas of the aggregates' statuses, written from the statuses the API shows.

/// The OpenAPI schema of a status: a string, one of `names`.
pub fn status_schema<'a>(
    names: impl IntoIterator<Item = &'a str>,
) -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
    utoipa::openapi::schema::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::String)
        .enum_values(Some(names))
        .into()
}
