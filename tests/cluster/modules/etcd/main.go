// Command etcd is upstream etcd's server entry point, built from the pinned go.etcd.io/etcd/server/v3
// (the etcd repository's root main.go does exactly this).
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
