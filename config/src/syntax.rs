//! TOML text to raw structs, and a TOML error to one [`FieldError`].
//!
//! toml reports where an error is as a byte span. An operator wants the key
//! (`models[1].max_batch_size`) as well as the line, so the span is mapped
//! back to the key path by walking the spanned document ([`DeTable`]).

use toml::de::{DeTable, DeValue};

use crate::FieldError;
use crate::raw::{RawConfig, RawModel};

pub(crate) fn parse_raw(text: &str) -> Result<RawConfig, FieldError> {
    toml::from_str::<RawConfig>(text).map_err(|error| describe(text, &error))
}

/// One `[[models]]` table on its own (a repository's `model.toml`).
pub(crate) fn parse_raw_model(text: &str) -> Result<RawModel, FieldError> {
    toml::from_str::<RawModel>(text).map_err(|error| describe(text, &error))
}

/// One error for a TOML syntax or type error: path is the key path where
/// the document parses (a type error, an unknown field), else the line and
/// column (a syntax error); the message is toml's, with the location.
fn describe(text: &str, error: &toml::de::Error) -> FieldError {
    let message = error.message().trim_end();
    let Some(span) = error.span() else {
        return FieldError::new("<toml>", message);
    };
    let (line, column) = line_column(text, span.start);
    match key_path_at(text, span.start) {
        Some(path) => FieldError::new(path, format!("{message} (line {line}, column {column})")),
        None => FieldError::new(format!("line {line}, column {column}"), message),
    }
}

/// 1-based line and column (in characters) of byte `offset` of `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |newline| newline + 1);
    let column = text[line_start..offset].chars().count() + 1;
    (line, column)
}

/// The deepest key path whose key or value holds byte `offset`, or `None`
/// where the text is not a TOML document or no key holds it.
fn key_path_at(text: &str, offset: usize) -> Option<String> {
    let document = DeTable::parse(text).ok()?;
    let mut best: Option<(usize, String)> = None;
    visit_table(document.get_ref(), offset, &mut Vec::new(), &mut best);
    best.map(|(_, path)| path)
}

enum Segment<'a> {
    Key(&'a str),
    Index(usize),
}

fn render(segments: &[Segment<'_>]) -> String {
    let mut path = String::new();
    for segment in segments {
        match segment {
            Segment::Key(key) => {
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(key);
            }
            Segment::Index(index) => path.push_str(&format!("[{index}]")),
        }
    }
    path
}

fn consider(segments: &[Segment<'_>], best: &mut Option<(usize, String)>) {
    // A table header's span holds only the header, a leaf's span only the
    // leaf, so the deepest path that holds the offset is the precise one.
    if best
        .as_ref()
        .is_none_or(|(depth, _)| segments.len() > *depth)
    {
        *best = Some((segments.len(), render(segments)));
    }
}

fn visit_table<'a>(
    table: &'a DeTable<'_>,
    offset: usize,
    segments: &mut Vec<Segment<'a>>,
    best: &mut Option<(usize, String)>,
) {
    for (key, value) in table.iter() {
        segments.push(Segment::Key(key.get_ref()));
        if key.span().contains(&offset) || value.span().contains(&offset) {
            consider(segments, best);
        }
        visit_value(value.get_ref(), offset, segments, best);
        segments.pop();
    }
}

fn visit_value<'a>(
    value: &'a DeValue<'_>,
    offset: usize,
    segments: &mut Vec<Segment<'a>>,
    best: &mut Option<(usize, String)>,
) {
    match value {
        DeValue::Table(table) => visit_table(table, offset, segments, best),
        DeValue::Array(array) => {
            for (index, element) in array.iter().enumerate() {
                segments.push(Segment::Index(index));
                if element.span().contains(&offset) {
                    consider(segments, best);
                }
                visit_value(element.get_ref(), offset, segments, best);
                segments.pop();
            }
        }
        _ => {}
    }
}
