//! Revoking on etcd.

use super::Inner;
use super::call::EtcdError;
use crate::server::store::Project;

impl Inner {
    pub(super) async fn revoke(
        &self,
        _project: &Project,
        _name: &str,
    ) -> Result<Option<u64>, EtcdError> {
        Ok(None)
    }
}
