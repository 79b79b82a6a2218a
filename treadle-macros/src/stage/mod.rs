//! `#[stage]`: parse the attribute and the function, validate them, generate
//! the stage type.

mod expand;
mod parse;

pub use expand::expand;

#[cfg(test)]
mod tests;
