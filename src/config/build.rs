//! TODO: file config -> Settings.
use super::{ConfigErrors, Loaded};

pub(crate) fn load_str(_text: &str) -> Result<Loaded, ConfigErrors> {
    todo!()
}
