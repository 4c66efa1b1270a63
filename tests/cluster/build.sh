#!/usr/bin/env bash
# Builds the real Kubernetes test control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
# kwok, the LeaderWorkerSet controller, helm, and kubectl when the machine has none) from upstream Go modules into a
# cache outside the repo:
#   ${DSV4_K8S_CACHE:-$HOME/.cache/dsv4/k8s}/<kubernetes version>/bin
# Every version is pinned once, in the wrapper modules' go.mod files under tests/cluster/modules/ (go.sum
# alongside); this script reads the versions from there. A binary is rebuilt only when its stamp (module
# version, go.sum hash, Go version, flags) differs, so a fully cached run takes seconds.
#
# Usage: tests/cluster/build.sh [--print-bin-dir]
#   DSV4_K8S_CACHE   cache root (default ~/.cache/dsv4/k8s)
#   DSV4_K8S_JOBS    parallel compile jobs (default 2: the CI machine has 2 shared cores)
set -euo pipefail
trap 'echo "build.sh: failed (line $LINENO, exit $?)" >&2' ERR

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
modules=$here/modules

export PATH=$PATH:/usr/local/go/bin
command -v go >/dev/null || { echo "build.sh: the go command is not installed (expected /usr/local/go/bin/go)" >&2; exit 1; }
# Server components are static in upstream releases too; cgo would only add a C compile step.
export CGO_ENABLED=0
export GOFLAGS="-trimpath -buildvcs=false -mod=readonly"
jobs=${DSV4_K8S_JOBS:-2}

# Prints the version that module dir $1 pins for module path $2.
module_version() {
	(cd "$modules/$1" && go list -m -f '{{.Version}}' "$2")
}

k8s_version=$(module_version kubernetes k8s.io/kubernetes)
cache=${DSV4_K8S_CACHE:-$HOME/.cache/dsv4/k8s}/$k8s_version
bin=$cache/bin

if [[ ${1:-} == --print-bin-dir ]]; then
	echo "$bin"
	exit 0
fi

mkdir -p "$bin" "$cache/stamps"
go_version=$(go env GOVERSION)
start_all=$SECONDS

# build NAME MODULE_DIR MODULE_PATH PACKAGE [LDFLAGS...]
build() {
	local name=$1 dir=$2 modpath=$3 pkg=$4
	shift 4
	local ldflags="-s -w $*"
	local version stamp
	version=$(module_version "$dir" "$modpath")
	stamp="$modpath $version $go_version $(find "$modules/$dir" -type f -print0 | sort -z | xargs -0 cat | sha256sum | cut -c1-16) $GOFLAGS $ldflags"
	if [[ -x $bin/$name && -f $cache/stamps/$name && $(<"$cache/stamps/$name") == "$stamp" ]]; then
		printf '%-24s cached    %s %s\n' "$name" "$modpath" "$version"
		return
	fi
	printf '%-24s building  %s %s ...\n' "$name" "$modpath" "$version"
	local t0=$SECONDS
	(cd "$modules/$dir" && go build -p "$jobs" -ldflags="$ldflags" -o "$bin/.$name.tmp" "$pkg")
	mv -f "$bin/.$name.tmp" "$bin/$name"
	echo "$stamp" >"$cache/stamps/$name"
	printf '%-24s built     in %ds (%s)\n' "$name" $((SECONDS - t0)) "$(du -h "$bin/$name" | cut -f1)"
}

# Version stamps the way upstream's hack/lib/version.sh sets them, so `kubectl version`, Helm's kubeVersion
# checks and discovery report the real release rather than v0.0.0-master.
minor=${k8s_version#v*.}
minor=${minor%%.*}
k8s_ldflags=()
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
	k8s_ldflags+=("-X $pkg.gitVersion=$k8s_version" "-X $pkg.gitMajor=1" "-X $pkg.gitMinor=$minor"
		"-X $pkg.gitTreeState=clean" "-X $pkg.buildDate=1970-01-01T00:00:00Z")
done

echo "build.sh: Kubernetes $k8s_version control plane into $bin (go $go_version, -p $jobs)"
build etcd etcd go.etcd.io/etcd/server/v3 dsv4.test/cluster/etcd
build kube-apiserver kubernetes k8s.io/kubernetes k8s.io/kubernetes/cmd/kube-apiserver "${k8s_ldflags[@]}"
build kube-scheduler kubernetes k8s.io/kubernetes k8s.io/kubernetes/cmd/kube-scheduler "${k8s_ldflags[@]}"
build kube-controller-manager kubernetes k8s.io/kubernetes k8s.io/kubernetes/cmd/kube-controller-manager "${k8s_ldflags[@]}"
kwok_version=$(module_version kwok sigs.k8s.io/kwok)
build kwok kwok sigs.k8s.io/kwok sigs.k8s.io/kwok/cmd/kwok "-X sigs.k8s.io/kwok/pkg/consts.Version=${kwok_version#v}"
helm_version=$(module_version helm helm.sh/helm/v3)
build helm helm helm.sh/helm/v3 helm.sh/helm/v3/cmd/helm "-X helm.sh/helm/v3/internal/version.version=$helm_version"
# kwok simulates nothing without Stage objects; take upstream's "fast" set (node initialise, heartbeat with a
# lease, pod ready/complete/delete) from the pinned module, so the stages always match the kwok binary.
kwok_dir=$(cd "$modules/kwok" && go mod download -json sigs.k8s.io/kwok | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')
mkdir -p "$cache/share"
for f in node/fast/node-initialize node/heartbeat-with-lease/node-heartbeat-with-lease pod/fast/pod-ready \
	pod/fast/pod-complete pod/fast/pod-delete; do
	echo "---"
	cat "$kwok_dir/kustomize/stage/$f.yaml"
done >"$cache/share/.kwok-stages.yaml.tmp"
mv -f "$cache/share/.kwok-stages.yaml.tmp" "$cache/share/kwok-stages.yaml"
# The LeaderWorkerSet controller (cmd/main.go of sigs.k8s.io/lws) and, from the same pinned module, its CRDs, so the
# CRDs always match the controller (it also runs a DisaggregatedSet controller, which needs that CRD to start).
lws_version=$(module_version lws sigs.k8s.io/lws)
build lws-controller lws sigs.k8s.io/lws sigs.k8s.io/lws/cmd "-X sigs.k8s.io/lws/pkg/version.GitVersion=$lws_version"
lws_dir=$(cd "$modules/lws" && go mod download -json sigs.k8s.io/lws | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')
for f in leaderworkerset.x-k8s.io_leaderworkersets disaggregatedset.x-k8s.io_disaggregatedsets; do
	echo "---"
	cat "$lws_dir/config/crd/bases/$f.yaml"
done >"$cache/share/.lws-crds.yaml.tmp"
mv -f "$cache/share/.lws-crds.yaml.tmp" "$cache/share/lws-crds.yaml"
rm -f "$cache/share/lws-crd.yaml"
if [[ -x $bin/kubectl ]] || ! command -v kubectl >/dev/null; then
	build kubectl kubernetes k8s.io/kubernetes k8s.io/kubernetes/cmd/kubectl "${k8s_ldflags[@]}"
fi
echo "build.sh: done in $((SECONDS - start_all))s; binaries in $bin"
