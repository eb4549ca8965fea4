/* The audit record queue's entry for native producers (agent._auditq_c, native/_auditq.pyx).
 *
 * A producer that formats a record itself appends its bytes without making a bytes object:
 *
 *     agent_auditq_api *api = PyCapsule_Import("agent._auditq_c.api", 0);
 *     -- or, from Python: queue.capsule() -> PyCapsule_GetPointer(capsule, AGENT_AUDITQ_CAPSULE)
 *     api->append(queue, data, n);
 *
 * append is called with the GIL held, from any thread; it copies the bytes and never blocks on I/O.
 * Returns 0: queued; 1: refused and counted in queue.dropped (the queue is full, or the record is not a
 * JSON object on a queue made with json_objects=True); -1: `queue` is not a RecordQueue (TypeError set).
 */
#ifndef AGENT_AUDITQ_API_H
#define AGENT_AUDITQ_API_H

#include <Python.h>

#define AGENT_AUDITQ_CAPSULE "agent._auditq_c.api"

typedef struct {
    int (*append)(PyObject *queue, const char *data, Py_ssize_t n); /* GIL held. 0: queued; 1: full -> counted dropped */
} agent_auditq_api;

#endif
