/* mirror's disk server (diskserver.c and its parts): an NBD server replicating per epoch.
   The cffi binding's declarations; the parts share diskserver_internal.h. */
#ifndef MIRROR_DISKSERVER_H
#define MIRROR_DISKSERVER_H
#include <stddef.h>
/* cdef-begin */
int mirror_diskserver_main(int argc, char **argv);
int mirror_disk_session_key(const unsigned char *secret, const unsigned char *peer, const unsigned char *ctx,
                            size_t n, unsigned char *out);
/* cdef-end */
#endif
