//! Fn's pages of a list: `per_page` items (30 unless asked, at most 100) in name order, and
//! `next_cursor`, which a client sends back as `cursor` for the items after them (empty on
//! the last page). The cursor is opaque: the last item's name and id, base64url.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;

use crate::error::ApiError;
use crate::model::List;

pub const DEFAULT_PER_PAGE: usize = 30;
pub const MAX_PER_PAGE: usize = 100;

/// The paging fields of a list's query.
#[derive(Debug, Default, Deserialize)]
pub struct Page {
    pub cursor: Option<String>,
    pub per_page: Option<usize>,
}

impl Page {
    /// The page of `items` (any order) this query asks for; `key` is an item's (name, id).
    pub fn of<T>(
        &self,
        mut items: Vec<T>,
        key: impl Fn(&T) -> (&str, &str),
    ) -> Result<List<T>, ApiError> {
        let per_page = self
            .per_page
            .unwrap_or(DEFAULT_PER_PAGE)
            .clamp(1, MAX_PER_PAGE);
        items.sort_by(|a, b| key(a).cmp(&key(b)));
        if let Some(cursor) = self.cursor.as_deref().filter(|c| !c.is_empty()) {
            let after = decode(cursor)?;
            items.retain(|i| {
                let (name, id) = key(i);
                (name, id) > (after.0.as_str(), after.1.as_str())
            });
        }
        let next_cursor = match items.get(per_page) {
            Some(_) => {
                let (name, id) = key(&items[per_page - 1]);
                URL_SAFE_NO_PAD.encode(format!("{name}\n{id}"))
            }
            None => String::new(),
        };
        items.truncate(per_page);
        Ok(List { items, next_cursor })
    }
}

fn decode(cursor: &str) -> Result<(String, String), ApiError> {
    let bad = || ApiError::bad_request("Invalid cursor");
    let bytes = URL_SAFE_NO_PAD.decode(cursor).map_err(|_| bad())?;
    let text = String::from_utf8(bytes).map_err(|_| bad())?;
    let (name, id) = text.split_once('\n').ok_or_else(bad)?;
    Ok((name.to_owned(), id.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key((n, i): &(String, String)) -> (&str, &str) {
        (n, i)
    }

    fn names(n: usize) -> Vec<(String, String)> {
        // Out of order, and one name twice (functions of two apps).
        let mut v: Vec<_> = (0..n)
            .rev()
            .map(|i| (format!("f{i:02}"), format!("id{i}")))
            .collect();
        v.push(("f03".into(), "id99".into()));
        v
    }

    #[test]
    fn pages_follow_their_cursors_through_every_item_once_in_name_order() {
        let all = names(7);
        let mut seen = Vec::new();
        let mut page = Page {
            cursor: None,
            per_page: Some(3),
        };
        loop {
            let list = page
                .of(all.clone(), |(n, i)| (n.as_str(), i.as_str()))
                .unwrap();
            assert!(list.items.len() <= 3);
            seen.extend(list.items);
            if list.next_cursor.is_empty() {
                break;
            }
            page.cursor = Some(list.next_cursor);
        }
        let mut want = all.clone();
        want.sort();
        assert_eq!(seen, want);
    }

    #[test]
    fn the_default_page_is_30_at_most_100_and_a_bad_cursor_is_refused() {
        let all = names(120);
        assert_eq!(
            Page::default().of(all.clone(), key).unwrap().items.len(),
            30
        );
        let big = Page {
            cursor: None,
            per_page: Some(500),
        };
        assert_eq!(big.of(all.clone(), key).unwrap().items.len(), 100);
        let bad = Page {
            cursor: Some("!!".into()),
            per_page: None,
        };
        assert_eq!(bad.of(all, key).unwrap_err().status, 400);
    }
}
