"""Scale-out: batch work on Ray and vectors in Milvus."""
