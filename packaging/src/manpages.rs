//! Man pages: clap_mangen's page of each command, followed by FILES and SEE ALSO.

use clap_mangen::roff::{bold, roman, Roff};
use clap_mangen::Man;

use crate::commands::Installed;
use crate::error::Error;

/// The file name of a command's man page, e.g. `umemd.8`.
pub fn file_name(c: &Installed) -> String {
    format!("{}.{}", c.name(), c.section)
}

/// The whole page, as roff source.
pub fn render(c: &Installed) -> Result<Vec<u8>, Error> {
    let mut page = Vec::new();
    let err = |source| Error::Render {
        what: file_name(c),
        source,
    };
    Man::new(c.command.clone())
        .section(c.section)
        // clap_mangen leaves an empty date unquoted, which shifts the footer's fields.
        .date(format!("version {}", env!("CARGO_PKG_VERSION")))
        .source("umem")
        .manual("umem manual")
        .render(&mut page)
        .map_err(err)?;
    let mut more = Roff::new();
    if !c.files.is_empty() {
        more.control("SH", ["FILES"]);
        for (path, what) in c.files {
            more.control("TP", []);
            more.text([bold(*path)]);
            more.text([roman(*what)]);
        }
    }
    more.control("SH", ["SEE ALSO"]);
    more.text([roman(c.see_also.join(", "))]);
    more.to_writer(&mut page).map_err(err)?;
    Ok(page)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands;

    #[test]
    fn every_page_documents_every_flag_in_its_section() {
        for c in commands::all() {
            let page = String::from_utf8(render(&c).unwrap()).unwrap();
            let title = format!(".TH {} {} ", c.name(), c.section);
            assert!(
                page.contains(&title),
                "{}: no {title:?} line",
                file_name(&c)
            );
            for arg in c.command.get_arguments() {
                let Some(long) = arg.get_long() else { continue };
                // roff escapes the dashes of option names.
                let flag = format!("\\-\\-{}", long.replace('-', "\\-"));
                assert!(page.contains(&flag), "{} lacks --{long}", file_name(&c));
            }
            assert!(
                page.contains(".SH \"SEE ALSO\""),
                "{} lacks SEE ALSO",
                file_name(&c)
            );
        }
    }
}
